-- Scalable-Chat message store, SQLite backend: schema versions 1 to 3.
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

-- Version 2: the full-text index of the embedded search backend (--search sqlite), kept in
-- the same transaction as every write to messages: a message is searchable exactly when it
-- is stored; an edit replaces its words, a delete removes them. Edits and deletes are
-- indexed by the triggers below; an append by the server's own INSERT beside the one into
-- messages (a trigger on INSERT measured 4-5 times slower: FTS5 flushes its pending terms
-- at the statement savepoint a trigger opens). A program other than chatd that inserts
-- rows must insert them into messages_fts too, as src/store/store_sqlite.c does.
-- Its rowid is the message id. chat and author hold hex(chat_id) and hex(user_from), one
-- token each, so a search names its chats and author inside the MATCH expression;
-- chat_id UNINDEXED joins back to messages. unicode61 remove_diacritics 2: language-neutral
-- word splitting with case and accent folding ("cafe" finds "café"). columnsize = 0: no
-- per-row token counts (only bm25 ranking needs them; hits come newest first). The last INSERT fills
-- the index from the rows of a version-1 database, once, when it is upgraded.
CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts USING fts5 (
    message, chat, author, chat_id UNINDEXED,
    tokenize = 'unicode61 remove_diacritics 2', columnsize = 0
);
CREATE TRIGGER IF NOT EXISTS messages_fts_update AFTER UPDATE OF message, deleted_at
    ON messages
BEGIN
    DELETE FROM messages_fts WHERE rowid = OLD.id AND chat_id = OLD.chat_id;
    INSERT OR REPLACE INTO messages_fts (rowid, message, chat, author, chat_id)
        SELECT NEW.id, NEW.message, hex(NEW.chat_id), hex(NEW.user_from), NEW.chat_id
        WHERE NEW.message IS NOT NULL AND NEW.deleted_at IS NULL;
END;
CREATE TRIGGER IF NOT EXISTS messages_fts_delete AFTER DELETE ON messages
BEGIN
    DELETE FROM messages_fts WHERE rowid = OLD.id AND chat_id = OLD.chat_id;
END;
INSERT OR REPLACE INTO messages_fts (rowid, message, chat, author, chat_id)
    SELECT id, message, hex(chat_id), hex(user_from), chat_id FROM messages
    WHERE message IS NOT NULL AND deleted_at IS NULL;

-- Version 3: read positions. One row per (chat, user): the newest message id the user has
-- read in that chat (a message of that chat; the server checks). The server only ever moves
-- message_id up (an upsert whose DO UPDATE has WHERE excluded.message_id > message_id), so a
-- stale tab reporting an older message never moves it back. updated_at: Unix ms.
CREATE TABLE IF NOT EXISTS read_positions (
    chat_id    TEXT    NOT NULL,
    user_id    TEXT    NOT NULL,
    message_id INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (chat_id, user_id)
) WITHOUT ROWID;
