"""Schema migrations, written once in the SQL both SQLite and PostgreSQL accept.

Each entry is one version; the store applies the missing ones in order inside a
transaction and records the version in ``schema_version``. Never edit a released entry:
append a new one.
"""

from __future__ import annotations

MIGRATIONS: list[list[str]] = [
    # 1: accounts, conversations, members, messages, blocks, groups
    [
        """CREATE TABLE users (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            password_hash TEXT,
            created_at BIGINT NOT NULL)""",
        """CREATE TABLE conversations (
            conv TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            last_seq BIGINT NOT NULL DEFAULT 0,
            created_at BIGINT NOT NULL)""",
        """CREATE TABLE conv_members (
            conv TEXT NOT NULL,
            user_id TEXT NOT NULL,
            role TEXT NOT NULL DEFAULT 'member',
            joined_seq BIGINT NOT NULL DEFAULT 1,
            left_seq BIGINT,
            read_seq BIGINT NOT NULL DEFAULT 0,
            delivered_seq BIGINT NOT NULL DEFAULT 0,
            mention_seq BIGINT NOT NULL DEFAULT 0,
            muted_until BIGINT NOT NULL DEFAULT 0,
            conv_muted INTEGER NOT NULL DEFAULT 0,
            joined_at BIGINT NOT NULL,
            PRIMARY KEY (conv, user_id))""",
        "CREATE INDEX conv_members_user ON conv_members (user_id)",
        """CREATE TABLE messages (
            conv TEXT NOT NULL,
            seq BIGINT NOT NULL,
            msg_id TEXT NOT NULL,
            sender TEXT NOT NULL,
            sender_device TEXT NOT NULL,
            client_msg_id TEXT,
            kind TEXT NOT NULL,
            body TEXT NOT NULL,
            mentions TEXT,
            ts BIGINT NOT NULL,
            recalled_by TEXT,
            recalled_at BIGINT,
            PRIMARY KEY (conv, seq))""",
        "CREATE UNIQUE INDEX messages_client_id ON messages (sender, client_msg_id)",
        """CREATE TABLE blocks (
            user_id TEXT NOT NULL,
            blocked TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            PRIMARY KEY (user_id, blocked))""",
        """CREATE TABLE chat_groups (
            group_id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            owner TEXT NOT NULL,
            announcement TEXT NOT NULL DEFAULT '',
            avatar TEXT NOT NULL DEFAULT '',
            join_policy TEXT NOT NULL DEFAULT 'approval',
            mute_all INTEGER NOT NULL DEFAULT 0,
            state TEXT NOT NULL DEFAULT 'active',
            created_by TEXT NOT NULL,
            created_at BIGINT NOT NULL)""",
        """CREATE TABLE group_requests (
            group_id TEXT NOT NULL,
            user_id TEXT NOT NULL,
            message TEXT NOT NULL DEFAULT '',
            created_at BIGINT NOT NULL,
            PRIMARY KEY (group_id, user_id))""",
    ],
    # 2: groups: who filed a join request on someone's behalf (a plain member's invite to an
    # approval group), and pending requests listed oldest first.
    [
        "ALTER TABLE group_requests ADD COLUMN invited_by TEXT",
        "CREATE INDEX group_requests_time ON group_requests (group_id, created_at)",
    ],
    # 3: a per-conversation change counter, so that a device that was offline learns of
    # changes to messages it already has (recalls): each change takes the conversation's
    # next change_seq and stores it on the message; msg.changes reads them in that order.
    # Messages never changed (nearly all) stay out of the partial index.
    [
        "ALTER TABLE conversations ADD COLUMN change_seq BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE messages ADD COLUMN change_seq BIGINT",
        "CREATE INDEX messages_changes ON messages (conv, change_seq) "
        "WHERE change_seq IS NOT NULL",
    ],
]
