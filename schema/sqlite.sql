-- Scalable-Chat message store, SQLite backend: schema version 1.
--
-- This file is for humans (docs, ad-hoc inspection with the sqlite3 shell). The server
-- embeds the same statements (src/store/store_sqlite.c, SCHEMA_V1) and applies them on
-- open, so no file is needed at run time; tests/unit/test_store_sqlite.c checks that the
-- two stay identical. The version is recorded in PRAGMA user_version; later upgrades are
-- appended as new versions and applied in order.
--
-- messages is a WITHOUT ROWID table clustered on (chat_id, id): every read the server does
-- is "one chat, a range of ids" (history pages, replay after a reconnect) and every write
-- names the chat, so one b-tree seek lands on the first row of a page and the rest follow
-- in the same leaf pages. A rowid table keyed by id would need a (chat_id, id) index plus
-- one extra seek per returned row, and one more b-tree to update per append.
-- id is the 64-bit Snowflake id (time-ordered, < 2^63, so it fits SQLite's signed INTEGER).
-- message is NULL once deleted (soft delete: the row keeps its id, author and times).
-- Times are Unix milliseconds.

CREATE TABLE IF NOT EXISTS messages (
    chat_id    TEXT    NOT NULL,
    id         INTEGER NOT NULL,
    user_from  TEXT    NOT NULL,
    message    TEXT,
    client_id  TEXT,
    created_at INTEGER NOT NULL,
    edited_at  INTEGER,
    deleted_at INTEGER,
    PRIMARY KEY (chat_id, id)
) WITHOUT ROWID;

-- Idempotent appends: a retry with the same (chat, user, client_id) finds the original.
CREATE UNIQUE INDEX IF NOT EXISTS messages_client_id
    ON messages (chat_id, user_from, client_id) WHERE client_id IS NOT NULL;
