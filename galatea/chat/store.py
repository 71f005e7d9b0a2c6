"""Characters, chats, messages and their alternatives (swipes), lorebooks and presets: in SQLite
(a file, the default) or PostgreSQL (a URL several Galatea processes share), same schema.

Every change is one transaction, so a crash or a kill at any moment leaves the database as it
was before or after that change: at most the reply being generated is lost (it is written when
it is complete). Several processes may use one database; writers wait for each other (one write
lock, database.py) instead of failing or interleaving.

A message has one or more swipes; its text is the active swipe's. User messages have one.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from galatea.chat.cards import Character, from_object
from galatea.chat.database import Database, is_url
from galatea.chat.lorebooks import Lorebook
from galatea.errors import GalateaError

SCHEMA = """
CREATE TABLE IF NOT EXISTS characters (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    card TEXT NOT NULL,            -- Character Card V2 JSON
    image BLOB,                    -- the PNG it came in, if any
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS chats (
    id INTEGER PRIMARY KEY,
    character_id INTEGER NOT NULL REFERENCES characters(id) ON DELETE CASCADE,
    title TEXT NOT NULL,
    user_name TEXT NOT NULL DEFAULT 'You',
    settings TEXT NOT NULL DEFAULT '{}',   -- per-chat sampling overrides, JSON
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    is_user INTEGER NOT NULL,
    name TEXT NOT NULL,
    active_swipe INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    UNIQUE (chat_id, position)
);
CREATE TABLE IF NOT EXISTS swipes (
    id INTEGER PRIMARY KEY,
    message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    text TEXT NOT NULL,
    seed INTEGER,
    gen_started REAL,
    gen_finished REAL,
    extra TEXT NOT NULL DEFAULT '{}',
    UNIQUE (message_id, idx)
);
CREATE INDEX IF NOT EXISTS chats_by_character ON chats (character_id, updated_at);
CREATE TABLE IF NOT EXISTS meta (              -- the library's own settings, e.g. settings for every chat
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL             -- JSON
);
CREATE TABLE IF NOT EXISTS presets (           -- the user's named sampler presets
    name TEXT PRIMARY KEY,
    settings TEXT NOT NULL          -- JSON
);
CREATE TABLE IF NOT EXISTS lorebooks (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    book TEXT NOT NULL,            -- a Character Card V2 character_book, JSON
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS lorebook_links (   -- a book used by a character's chats, or by one chat
    id INTEGER PRIMARY KEY,
    lorebook_id INTEGER NOT NULL REFERENCES lorebooks(id) ON DELETE CASCADE,
    character_id INTEGER REFERENCES characters(id) ON DELETE CASCADE,
    chat_id INTEGER REFERENCES chats(id) ON DELETE CASCADE,
    CHECK ((character_id IS NULL) != (chat_id IS NULL))
);
"""
# Changes to the schema after version 1, one list of statements each (run once, in order), or
# one list per database where they differ.
MIGRATIONS: list[list[str] | dict[str, list[str]]] = [
    [],
    # 2: full-text search of message text (recall): SQLite's FTS5 over swipes, kept by triggers;
    # PostgreSQL's text search on an expression index
    {"sqlite": [
        "CREATE VIRTUAL TABLE IF NOT EXISTS swipes_fts USING fts5(text, content='swipes', content_rowid='id', "
        "tokenize='porter unicode61')",
        "CREATE TRIGGER IF NOT EXISTS swipes_fts_insert AFTER INSERT ON swipes BEGIN "
        "INSERT INTO swipes_fts (rowid, text) VALUES (new.id, new.text); END",
        "CREATE TRIGGER IF NOT EXISTS swipes_fts_delete AFTER DELETE ON swipes BEGIN "
        "INSERT INTO swipes_fts (swipes_fts, rowid, text) VALUES ('delete', old.id, old.text); END",
        "CREATE TRIGGER IF NOT EXISTS swipes_fts_update AFTER UPDATE OF text ON swipes BEGIN "
        "INSERT INTO swipes_fts (swipes_fts, rowid, text) VALUES ('delete', old.id, old.text); "
        "INSERT INTO swipes_fts (rowid, text) VALUES (new.id, new.text); END",
        "INSERT INTO swipes_fts (swipes_fts) VALUES ('rebuild')",
    ], "postgres": [
        "CREATE INDEX IF NOT EXISTS swipes_text_search ON swipes USING GIN (to_tsvector('english', text))",
    ]},
]


@dataclass
class Swipe:
    text: str
    seed: int | None = None
    gen_started: float | None = None
    gen_finished: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Message:
    id: int
    position: int
    is_user: bool
    name: str
    swipes: list[Swipe]
    active: int
    created_at: float

    @property
    def text(self) -> str:
        return self.swipes[self.active].text


@dataclass
class ChatInfo:
    id: int
    character_id: int
    title: str
    user_name: str
    settings: dict[str, Any]
    created_at: float
    updated_at: float
    messages: int = 0


def default_data_dir() -> Path:
    """$GALATEA_DATA_DIR, else the platform's per-user data folder."""
    if os.environ.get("GALATEA_DATA_DIR"):
        return Path(os.environ["GALATEA_DATA_DIR"]).expanduser()
    if sys.platform == "win32":
        return Path(os.environ.get("APPDATA", Path.home() / "AppData" / "Roaming")) / "galatea"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "galatea"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "galatea"


class Store:
    """The chat database: SQLite at a path (the default), or PostgreSQL at a URL
    (`postgresql://user@host/db`) that several Galatea processes may share. All SQL is here."""

    def __init__(self, location: Path | str) -> None:
        self.database = Database(location)
        try:
            self.database.setup(SCHEMA)
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise GalateaError(f"{location}: cannot open the chat database ({e}); move it aside or pass "
                               "another --data-dir") from None
        except OSError as e:
            raise GalateaError(f"{Path(location).parent}: cannot create the data folder ({e.strerror}); "
                               "pass --data-dir") from None

    @property
    def db(self) -> Any:
        """Statements on a pooled connection (`execute(sql, params)` with `?` placeholders)."""
        return self.database.statements

    @property
    def label(self) -> str:
        """Where the chats are, for messages (a URL without its password)."""
        return self.database.label

    @classmethod
    def open_default(cls, data_dir: Path | str | None = None, store: str | None = None) -> Store:
        """`store`: a PostgreSQL URL (or an SQLite file); else galatea.db in the data folder."""
        if store is not None:
            if not store.strip():
                raise GalateaError("--store is empty; pass postgresql://USER@HOST/DB or a file (or leave it out)")
            return cls(store if is_url(store) else Path(store).expanduser())
        if data_dir is not None and not str(data_dir).strip():
            raise GalateaError("--data-dir is empty; pass a folder (or leave the option out for the default)")
        return cls(Path(data_dir or default_data_dir()).expanduser() / "galatea.db")

    def close(self) -> None:
        self.database.close()

    def ping(self) -> None:
        """Raises StoreUnavailable unless the database answers (the server's /health)."""
        self.database.ping()

    def _write(self) -> Any:
        """One write transaction (see database.py): all of it, or nothing on an error."""
        return self.database.write()

    def schema_version(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return 0 if row is None else int(json.loads(row[0]))

    def _migrate(self) -> None:
        """Bring an older database up to this version's schema, recorded in `meta`. Version 1 is
        SCHEMA as created above; each later change appends one idempotent step here."""
        version = self.schema_version()
        for number, step in enumerate(MIGRATIONS, 1):
            if number > version:
                statements = step[("sqlite", "postgres")[self.database.postgres]] if isinstance(step, dict) else step
                with self._write() as db:
                    for statement in statements:
                        db.execute(statement)
        if version < max(len(MIGRATIONS), 1):
            with self._write() as db:
                db.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?) ON CONFLICT (key) "
                           "DO UPDATE SET value = excluded.value", (json.dumps(max(len(MIGRATIONS), 1)),))

    # ---- characters ----------------------------------------------------------------------------

    def add_character(self, char: Character) -> int:
        with self._write() as db:
            cur = db.execute("INSERT INTO characters (name, card, image, created_at) VALUES (?, ?, ?, ?) RETURNING id",
                             (char.name, _card_json(char), char.image, time.time()))
            return int(cur.fetchone()[0])

    def add_first_character(self, char: Character) -> int | None:
        """Add `char` if the library has no character at all (a first start); in one transaction,
        so replicas starting together on one database add it once. Its id, or None."""
        with self._write() as db:
            if db.execute("SELECT 1 FROM characters LIMIT 1").fetchone() is not None:
                return None
            cur = db.execute("INSERT INTO characters (name, card, image, created_at) VALUES (?, ?, ?, ?) RETURNING id",
                             (char.name, _card_json(char), char.image, time.time()))
            return int(cur.fetchone()[0])

    def find_character(self, char: Character) -> int | None:
        """The library's copy of exactly this card (every field and the picture), if any: importing
        the same card twice gives the same character, not an indistinguishable twin."""
        row = self.db.execute("SELECT id FROM characters WHERE card = ? AND image IS NOT DISTINCT FROM ? "
                              "ORDER BY id",
                              (_card_json(char), char.image)).fetchone()
        return None if row is None else int(row[0])

    def update_character(self, character_id: int, char: Character) -> None:
        """The card's fields (and picture, when `char.image` is set); chats keep going with it."""
        with self._write() as db:
            cur = db.execute("UPDATE characters SET name = ?, card = ?, image = coalesce(?, image) WHERE id = ?",
                             (char.name, _card_json(char), char.image, character_id))
            if cur.rowcount == 0:
                raise GalateaError(f"no character {character_id}; see `galatea characters list`")

    def characters(self) -> list[tuple[int, str]]:
        return [(r[0], r[1]) for r in self.db.execute("SELECT id, name FROM characters ORDER BY name, id")]

    def character(self, key: int | str) -> tuple[int, Character]:
        """By id, or by name (case-insensitive; the newest of that name)."""
        if isinstance(key, int) or str(key).isdigit():
            row = self.db.execute("SELECT id, card, image FROM characters WHERE id = ?", (int(key),)).fetchone()
        else:
            row = self.db.execute("SELECT id, card, image FROM characters WHERE lower(name) = lower(?) "
                                  "ORDER BY id DESC", (key,)).fetchone()
        if row is None:
            raise GalateaError(f"no character {key!r} in the library; see `galatea characters list`")
        char = from_object(json.loads(row[1]), where=f"character {row[0]}")
        char.image = row[2]
        return row[0], char

    def delete_character(self, character_id: int) -> None:
        with self._write() as db:
            db.execute("DELETE FROM characters WHERE id = ?", (character_id,))

    # ---- chats ---------------------------------------------------------------------------------

    def new_chat(self, character_id: int, user_name: str = "You", title: str | None = None,
                 greeting: bool = True, created_at: float | None = None) -> int:
        """A new chat; the character's greeting is its first message, alternate greetings its swipes.
        `created_at`: when it began (an imported chat's own date)."""
        _, char = self.character(character_id)
        now = created_at or time.time()
        with self._write() as db:
            cur = db.execute("INSERT INTO chats (character_id, title, user_name, created_at, updated_at) "
                             "VALUES (?, ?, ?, ?, ?) RETURNING id",
                             (character_id, title or f"{char.name} - {time.strftime('%Y-%m-%d %H:%M')}",
                              user_name, now, now))
            chat_id = int(cur.fetchone()[0])
            greetings = [g for g in [char.first_mes, *char.alternate_greetings] if g.strip()]
            if greeting and greetings:
                self._insert_message(db, chat_id, False, char.name, [Swipe(g) for g in greetings])
            return chat_id

    def chat(self, chat_id: int) -> ChatInfo:
        row = self.db.execute("SELECT id, character_id, title, user_name, settings, created_at, updated_at, "
                              "(SELECT count(*) FROM messages m WHERE m.chat_id = chats.id) "
                              "FROM chats WHERE id = ?", (chat_id,)).fetchone()
        if row is None:
            raise GalateaError(f"no chat {chat_id}; see `galatea chats list`")
        return ChatInfo(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5], row[6], row[7])

    def chats(self, character_id: int | None = None) -> list[ChatInfo]:
        where, args = ("WHERE character_id = ?", (character_id,)) if character_id is not None else ("", ())
        ids = [r[0] for r in self.db.execute(f"SELECT id FROM chats {where} ORDER BY updated_at DESC, id DESC",
                                             args)]
        return [self.chat(i) for i in ids]

    def last_chat(self, character_id: int) -> int | None:
        row = self.db.execute("SELECT id FROM chats WHERE character_id = ? ORDER BY updated_at DESC, id DESC",
                              (character_id,)).fetchone()
        return None if row is None else int(row[0])

    def delete_chat(self, chat_id: int) -> None:
        with self._write() as db:
            db.execute("DELETE FROM chats WHERE id = ?", (chat_id,))

    def rename_chat(self, chat_id: int, title: str) -> None:
        with self._write() as db:
            if db.execute("UPDATE chats SET title = ? WHERE id = ?", (title, chat_id)).rowcount == 0:
                raise GalateaError(f"no chat {chat_id}; see `galatea chats list`")

    def search(self, text: str, character_id: int | None = None, limit: int = 50) -> list[tuple[int, int, str]]:
        """Messages whose text (any swipe) contains `text`, case-insensitively, newest chats
        first: (chat id, message position, the matching text)."""
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        where = "AND c.character_id = ?" if character_id is not None else ""
        args: tuple[Any, ...] = (pattern, character_id, limit) if character_id is not None else (pattern, limit)
        rows = self.db.execute(
            "SELECT c.id, m.position, min(s.text) FROM swipes s JOIN messages m ON m.id = s.message_id "
            f"JOIN chats c ON c.id = m.chat_id WHERE lower(s.text) LIKE lower(?) ESCAPE '\\' {where} "
            "GROUP BY c.id, m.position, c.updated_at ORDER BY c.updated_at DESC, m.position LIMIT ?", args).fetchall()
        return [(int(r[0]), int(r[1]), r[2]) for r in rows]

    def recall(self, chat_id: int, terms: list[str], limit: int = 20) -> list[int]:
        """Ids of this chat's messages whose shown text matches any of `terms` (recall.query_terms),
        best first: BM25 over SQLite's FTS5 index, ts_rank on PostgreSQL."""
        if not terms:
            return []
        if self.database.postgres:
            query = " | ".join(terms)
            rows = self.db.execute(
                "SELECT m.id FROM swipes s JOIN messages m ON m.id = s.message_id "
                "WHERE to_tsvector('english', s.text) @@ to_tsquery('english', ?) AND m.chat_id = ? "
                "AND s.idx = m.active_swipe "
                "ORDER BY ts_rank(to_tsvector('english', s.text), to_tsquery('english', ?)) DESC, m.position LIMIT ?",
                (query, chat_id, query, limit)).fetchall()
        else:
            query = " OR ".join(f'"{t}"' for t in terms)
            rows = self.db.execute(
                "SELECT m.id FROM swipes_fts f JOIN swipes s ON s.id = f.rowid JOIN messages m ON m.id = s.message_id "
                "WHERE swipes_fts MATCH ? AND m.chat_id = ? AND s.idx = m.active_swipe "
                "ORDER BY bm25(swipes_fts), m.position LIMIT ?", (query, chat_id, limit)).fetchall()
        return [int(r[0]) for r in rows]

    def rename_user(self, chat_id: int, user_name: str) -> None:
        """The user's display name in this chat; their past messages take the new name too."""
        with self._write() as db:
            db.execute("UPDATE chats SET user_name = ?, updated_at = ? WHERE id = ?", (user_name, time.time(), chat_id))
            db.execute("UPDATE messages SET name = ? WHERE chat_id = ? AND is_user = 1", (user_name, chat_id))

    def set_settings(self, chat_id: int, settings: dict[str, Any]) -> None:
        with self._write() as db:
            db.execute("UPDATE chats SET settings = ? WHERE id = ?", (json.dumps(settings), chat_id))

    def default_settings(self) -> dict[str, Any]:
        """Settings every chat starts from (its own override them)."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'default_settings'").fetchone()
        return {} if row is None else json.loads(row[0])

    def set_default_settings(self, settings: dict[str, Any]) -> None:
        with self._write() as db:
            db.execute("INSERT INTO meta (key, value) VALUES ('default_settings', ?) "
                       "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (json.dumps(settings),))

    def presets(self) -> dict[str, dict[str, Any]]:
        return {r[0]: json.loads(r[1]) for r in self.db.execute("SELECT name, settings FROM presets ORDER BY name")}

    def save_preset(self, name: str, settings: dict[str, Any]) -> None:
        with self._write() as db:
            db.execute("INSERT INTO presets (name, settings) VALUES (?, ?) "
                       "ON CONFLICT (name) DO UPDATE SET settings = excluded.settings", (name, json.dumps(settings)))

    def delete_preset(self, name: str) -> None:
        with self._write() as db:
            if db.execute("DELETE FROM presets WHERE name = ?", (name,)).rowcount == 0:
                raise GalateaError(f"no preset {name!r} of yours (built-in presets cannot be deleted)")

    # ---- messages ------------------------------------------------------------------------------

    def messages(self, chat_id: int) -> list[Message]:
        rows = self.db.execute("SELECT id, position, is_user, name, active_swipe, created_at FROM messages "
                               "WHERE chat_id = ? ORDER BY position", (chat_id,)).fetchall()
        swipes: dict[int, list[Swipe]] = {r[0]: [] for r in rows}
        for mid, text, seed, gs, gf, extra in self.db.execute(
                "SELECT s.message_id, s.text, s.seed, s.gen_started, s.gen_finished, s.extra FROM swipes s "
                "JOIN messages m ON m.id = s.message_id WHERE m.chat_id = ? ORDER BY s.message_id, s.idx",
                (chat_id,)):
            swipes[mid].append(Swipe(text, seed, gs, gf, json.loads(extra)))
        return [Message(r[0], r[1], bool(r[2]), r[3], swipes[r[0]], min(r[4], len(swipes[r[0]]) - 1), r[5])
                for r in rows]

    def add_message(self, chat_id: int, is_user: bool, name: str, text: str, seed: int | None = None,
                    gen_started: float | None = None, gen_finished: float | None = None,
                    extra: dict[str, Any] | None = None) -> int:
        with self._write() as db:
            return self._insert_message(db, chat_id, is_user, name,
                                        [Swipe(text, seed, gen_started, gen_finished, extra or {})])

    def add_message_swipes(self, chat_id: int, is_user: bool, name: str, swipes: list[Swipe],
                           active: int = 0, created_at: float | None = None) -> int:
        """A message with all its alternatives at once (imports, with their own dates)."""
        with self._write() as db:
            return self._insert_message(db, chat_id, is_user, name, swipes, active, created_at)

    def _insert_message(self, db: Any, chat_id: int, is_user: bool, name: str,
                        swipes: list[Swipe], active: int = 0, created_at: float | None = None) -> int:
        (pos,) = db.execute("SELECT coalesce(max(position), -1) + 1 FROM messages WHERE chat_id = ?",
                            (chat_id,)).fetchone()
        now = created_at or time.time()
        cur = db.execute("INSERT INTO messages (chat_id, position, is_user, name, active_swipe, created_at) "
                         "VALUES (?, ?, ?, ?, ?, ?) RETURNING id", (chat_id, pos, int(is_user), name, active, now))
        mid = int(cur.fetchone()[0])
        for i, s in enumerate(swipes):
            db.execute("INSERT INTO swipes (message_id, idx, text, seed, gen_started, gen_finished, extra) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (mid, i, s.text, s.seed, s.gen_started, s.gen_finished, json.dumps(s.extra)))
        # the chat was active now, even when the message is an old one (imports, branches)
        db.execute("UPDATE chats SET updated_at = ? WHERE id = ?", (time.time(), chat_id))
        return mid

    def add_swipe(self, message_id: int, text: str, seed: int | None = None, gen_started: float | None = None,
                  gen_finished: float | None = None, extra: dict[str, Any] | None = None) -> int:
        """A new alternative for a message (regenerate); it becomes the active one."""
        with self._write() as db:
            (n,) = db.execute("SELECT count(*) FROM swipes WHERE message_id = ?", (message_id,)).fetchone()
            db.execute("INSERT INTO swipes (message_id, idx, text, seed, gen_started, gen_finished, extra) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)", (message_id, n, text, seed, gen_started, gen_finished,
                                                        json.dumps(extra or {})))
            db.execute("UPDATE messages SET active_swipe = ? WHERE id = ?", (n, message_id))
            self._touch(db, message_id)
            return int(n)

    def swipe(self, message_id: int, step: int) -> int:
        """Move the active alternative by `step` (clamped); returns the new index."""
        with self._write() as db:
            row = db.execute("SELECT active_swipe, (SELECT count(*) FROM swipes WHERE message_id = ?) "
                             "FROM messages WHERE id = ?", (message_id, message_id)).fetchone()
            if row is None:
                raise GalateaError(f"no message {message_id}")
            new = max(0, min(row[1] - 1, row[0] + step))
            db.execute("UPDATE messages SET active_swipe = ? WHERE id = ?", (new, message_id))
            return new

    def edit_message(self, message_id: int, text: str) -> None:
        """Replace the text of the message's active alternative."""
        with self._write() as db:
            cur = db.execute("UPDATE swipes SET text = ? WHERE message_id = ? AND idx = "
                             "(SELECT active_swipe FROM messages WHERE id = ?)", (text, message_id, message_id))
            if cur.rowcount == 0:
                raise GalateaError(f"no message {message_id}")
            self._touch(db, message_id)

    def append_to_message(self, message_id: int, text: str) -> None:
        """Continue: add text to the active alternative."""
        with self._write() as db:
            db.execute("UPDATE swipes SET text = text || ? WHERE message_id = ? AND idx = "
                       "(SELECT active_swipe FROM messages WHERE id = ?)", (text, message_id, message_id))
            self._touch(db, message_id)

    def delete_message(self, message_id: int) -> None:
        with self._write() as db:
            db.execute("DELETE FROM messages WHERE id = ?", (message_id,))

    def undo_last_exchange(self, chat_id: int) -> int:
        """Delete the last user message and everything after it (the last exchange); returns
        how many messages went. A chat holding only the greeting is left alone."""
        with self._write() as db:
            row = db.execute("SELECT max(position) FROM messages WHERE chat_id = ? AND is_user = 1",
                             (chat_id,)).fetchone()
            if row[0] is None:
                return 0
            cur = db.execute("DELETE FROM messages WHERE chat_id = ? AND position >= ?", (chat_id, row[0]))
            return cur.rowcount

    def branch(self, chat_id: int, message_id: int) -> int:
        """A new chat holding copies of this chat's messages up to and including `message_id`."""
        info = self.chat(chat_id)
        msgs = self.messages(chat_id)
        upto = next((i for i, m in enumerate(msgs) if m.id == message_id), None)
        if upto is None:
            raise GalateaError(f"message {message_id} is not in chat {chat_id}")
        now = time.time()
        with self._write() as db:
            cur = db.execute("INSERT INTO chats (character_id, title, user_name, settings, created_at, updated_at) "
                             "VALUES (?, ?, ?, ?, ?, ?) RETURNING id", (info.character_id, f"{info.title} (branch)",
                                                                       info.user_name, json.dumps(info.settings), now,
                                                                       now))
            new_id = int(cur.fetchone()[0])
            for m in msgs[: upto + 1]:
                self._insert_message(db, new_id, m.is_user, m.name, m.swipes, m.active, m.created_at)
            return new_id

    def _touch(self, db: Any, message_id: int) -> None:
        db.execute("UPDATE chats SET updated_at = ? WHERE id = (SELECT chat_id FROM messages WHERE id = ?)",
                   (time.time(), message_id))

    # ---- lorebooks -----------------------------------------------------------------------------

    def add_lorebook(self, book: Lorebook) -> int:
        with self._write() as db:
            cur = db.execute("INSERT INTO lorebooks (name, book, created_at) VALUES (?, ?, ?) RETURNING id",
                             (book.name, json.dumps(book.book, ensure_ascii=False), time.time()))
            return int(cur.fetchone()[0])

    def lorebooks(self) -> list[tuple[int, Lorebook]]:
        rows = self.db.execute("SELECT id, name, book FROM lorebooks ORDER BY name, id").fetchall()
        return [(int(r[0]), Lorebook(r[1], json.loads(r[2]))) for r in rows]

    def lorebook(self, key: int | str) -> tuple[int, Lorebook]:
        """By id, or by name (case-insensitive; the newest of that name)."""
        if isinstance(key, int) or str(key).isdigit():
            row = self.db.execute("SELECT id, name, book FROM lorebooks WHERE id = ?", (int(key),)).fetchone()
        else:
            row = self.db.execute("SELECT id, name, book FROM lorebooks WHERE lower(name) = lower(?) "
                                  "ORDER BY id DESC", (key,)).fetchone()
        if row is None:
            raise GalateaError(f"no lorebook {key!r}; see `galatea lorebooks list`")
        return int(row[0]), Lorebook(row[1], json.loads(row[2]))

    def update_lorebook(self, lorebook_id: int, book: Lorebook) -> None:
        with self._write() as db:
            cur = db.execute("UPDATE lorebooks SET name = ?, book = ? WHERE id = ?",
                             (book.name, json.dumps(book.book, ensure_ascii=False), lorebook_id))
            if cur.rowcount == 0:
                raise GalateaError(f"no lorebook {lorebook_id}; see `galatea lorebooks list`")

    def delete_lorebook(self, lorebook_id: int) -> None:
        with self._write() as db:
            db.execute("DELETE FROM lorebooks WHERE id = ?", (lorebook_id,))

    def attach_lorebook(self, lorebook_id: int, *, character_id: int | None = None, chat_id: int | None = None,
                        attached: bool = True) -> None:
        """Use the book in every chat with a character, or in one chat (`attached=False`: stop)."""
        if (character_id is None) == (chat_id is None):
            raise GalateaError("attach a lorebook to a character or to a chat (one of the two)")
        self.lorebook(lorebook_id)  # each must exist: a clear error rather than a foreign-key one
        if character_id is not None:
            self.character(character_id)
        else:
            self.chat(chat_id)  # type: ignore[arg-type]
        with self._write() as db:
            db.execute("DELETE FROM lorebook_links WHERE lorebook_id = ? AND character_id IS NOT DISTINCT FROM ? "
                       "AND chat_id IS NOT DISTINCT FROM ?",
                       (lorebook_id, character_id, chat_id))
            if attached:
                db.execute("INSERT INTO lorebook_links (lorebook_id, character_id, chat_id) VALUES (?, ?, ?)",
                           (lorebook_id, character_id, chat_id))

    def lorebook_links(self, lorebook_id: int) -> dict[str, list[int]]:
        rows = self.db.execute("SELECT character_id, chat_id FROM lorebook_links WHERE lorebook_id = ? "
                               "ORDER BY id", (lorebook_id,)).fetchall()
        return {"characters": [r[0] for r in rows if r[0] is not None],
                "chats": [r[1] for r in rows if r[1] is not None]}

    def chat_lorebooks(self, chat_id: int) -> list[tuple[int, Lorebook]]:
        """The books a chat reads: those attached to its character, then its own (each once)."""
        rows = self.db.execute(
            "SELECT l.id, l.name, l.book FROM lorebooks l JOIN lorebook_links k ON k.lorebook_id = l.id "
            "WHERE k.chat_id = ? OR k.character_id = (SELECT character_id FROM chats WHERE id = ?) "
            "ORDER BY k.chat_id IS NOT NULL, k.id", (chat_id, chat_id)).fetchall()
        seen: dict[int, Lorebook] = {}
        for r in rows:
            seen.setdefault(int(r[0]), Lorebook(r[1], json.loads(r[2])))
        return list(seen.items())


def _card_json(char: Character) -> str:
    return json.dumps(char.to_v2(), ensure_ascii=False)


def copy_library(src: Store, dst: Store) -> dict[str, int]:
    """Everything in `src` added to `dst`: characters (one already there, the same card, is
    reused), chats with every message, swipe and date, lorebooks and where they are attached,
    presets and the settings for every chat. Ids are `dst`'s own. Returns what was copied."""
    characters: dict[int, int] = {}
    for cid, _ in src.characters():
        char = src.character(cid)[1]
        found = dst.find_character(char)
        characters[cid] = found if found is not None else dst.add_character(char)
    chats: dict[int, int] = {}
    for info in reversed(src.chats()):  # oldest first: the newest stays the newest
        new = dst.new_chat(characters[info.character_id], user_name=info.user_name, title=info.title,
                           greeting=False, created_at=info.created_at)
        dst.set_settings(new, info.settings)
        for m in src.messages(info.id):
            dst.add_message_swipes(new, m.is_user, m.name, m.swipes, m.active, created_at=m.created_at)
        chats[info.id] = new
    books = src.lorebooks()
    for lid, book in books:
        new = dst.add_lorebook(book)
        links = src.lorebook_links(lid)
        for c in links["characters"]:
            dst.attach_lorebook(new, character_id=characters[c])
        for c in links["chats"]:
            dst.attach_lorebook(new, chat_id=chats[c])
    presets = src.presets()
    for name, settings in presets.items():
        dst.save_preset(name, settings)
    if src.default_settings():
        dst.set_default_settings({**dst.default_settings(), **src.default_settings()})
    return {"characters": len(characters), "chats": len(chats), "lorebooks": len(books), "presets": len(presets)}
