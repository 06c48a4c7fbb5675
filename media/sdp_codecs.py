"""Which codecs the relay forwards, and checks of remote SDP against them.

The relay forwards the publisher's encoded frames, so every leg of a room uses the same
codec per kind: VP8 and Opus. A remote description that offers or answers a sending
section without them is refused up front with a clear error, before aiortc state changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiortc import RTCRtpCodecCapability, RTCRtpSender
from aiortc import sdp as aiortc_sdp

from im_bridge.errors import BadRequest, Unsupported

# The codec each kind is forwarded with by default (media.frames assembles these, and
# H264 for rooms configured with it).
FORWARDED_CODECS = {"audio": "audio/opus", "video": "video/VP8"}
VIDEO_CODECS = ("video/VP8", "video/H264")


def forwarded_codecs(video: str = "VP8") -> dict[str, str]:
    """Per-kind MIME types for a relay whose video codec is ``video`` (``VP8`` or ``H264``)."""
    mime = f"video/{video}"
    if mime not in VIDEO_CODECS:
        raise ValueError(f"the relay forwards {', '.join(VIDEO_CODECS)}, not {mime}")
    return {"audio": "audio/opus", "video": mime}


@dataclass(frozen=True, slots=True)
class MediaSection:
    """What one m-section of a remote description says."""

    index: int
    mid: str | None
    kind: str
    direction: str
    rejected: bool
    codecs: tuple[str, ...]


def parse_sections(sdp_text: str) -> list[MediaSection]:
    """The audio/video m-sections of ``sdp_text``; :class:`BadRequest` if it does not parse."""
    if not isinstance(sdp_text, str) or not sdp_text.startswith("v=0"):
        raise BadRequest("sdp must be an SDP text starting with v=0")
    try:
        description = aiortc_sdp.SessionDescription.parse(sdp_text)
    except Exception as exc:  # aiortc raises ValueError, KeyError, IndexError on junk
        raise BadRequest(f"unparsable SDP: {exc}") from None
    sections = []
    for i, media in enumerate(description.media):
        if media.kind not in ("audio", "video"):
            continue
        sections.append(
            MediaSection(
                index=i,
                mid=media.rtp.muxId,
                kind=media.kind,
                direction=media.direction or "sendrecv",
                rejected=media.port == 0,
                codecs=tuple(c.mimeType for c in media.rtp.codecs),
            )
        )
    return sections


def check_codecs(
    sdp_text: str, *, sending_only: bool, codecs: dict[str, str] = FORWARDED_CODECS
) -> list[MediaSection]:
    """Refuse (:class:`Unsupported`) a description whose media cannot be forwarded.

    ``sending_only``: only sections the remote sends on must carry the forwarded codec
    (offers); otherwise every accepted section must (answers to the relay's offers).
    """
    sections = parse_sections(sdp_text)
    for s in sections:
        if s.rejected:
            continue
        if sending_only and s.direction not in ("sendrecv", "sendonly"):
            continue
        wanted = codecs[s.kind]
        if wanted.lower() not in (c.lower() for c in s.codecs):
            offered = ", ".join(
                sorted({c.split("/")[1] for c in s.codecs if not c.lower().endswith("/rtx")})
            )
            raise Unsupported(
                f"{s.kind} section {s.mid or s.index} offers {offered or 'no codec'}; "
                f"the relay forwards {wanted.split('/')[1]} only",
                kind=s.kind,
                supported=[wanted],
            )
    return sections


def codec_preferences(
    kind: str, codecs: dict[str, str] = FORWARDED_CODECS
) -> list[RTCRtpCodecCapability]:
    """Codec preferences that make aiortc offer only the forwarded codec (plus RTX for video;
    for H264 both of aiortc's profiles, constrained baseline and baseline, packetization 1)."""
    wanted = codecs[kind].lower()
    caps = RTCRtpSender.getCapabilities(kind).codecs
    return [c for c in caps if c.mimeType.lower() in (wanted, "video/rtx")]
