"""How tests/data/v1 was made, by dbre 0.x at commit 69d9262 (format 1), kept for the record:
two snapshots of a small database in a plain and an encrypted repository (passphrase below)."""
import os

import apsw

from dbre.repository.backup import backup
from dbre.repository.repo import Repository
from dbre.secrets import Secret
from dbre.sources.local import LocalFileSource

PASSPHRASE = "v1-golden-passphrase"
here = os.path.dirname(os.path.abspath(__file__))
db = os.path.join(here, "app.db")
c = apsw.Connection(db)
c.execute("PRAGMA journal_mode=WAL").fetchall()
c.execute("CREATE TABLE orders(id INTEGER PRIMARY KEY, customer TEXT, total REAL)")
with c:
    for i in range(1, 2001):
        c.execute("INSERT INTO orders(customer,total) VALUES(?,?)", (f"c{i}", i * 1.5))
for name, key in (("plain", None), ("encrypted", Secret(PASSPHRASE))):
    repo = Repository.open_or_init(os.path.join(here, name), key)
    backup(repo, LocalFileSource(db), "app")
with c:
    c.execute("UPDATE orders SET total = total + 1 WHERE id % 7 = 0")
    c.execute("INSERT INTO orders(customer,total) VALUES('late', 99)")
for name, key in (("plain", None), ("encrypted", Secret(PASSPHRASE))):
    repo = Repository.open(os.path.join(here, name), key)
    backup(repo, LocalFileSource(db), "app")
c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
c.close()
for f in ("app.db-wal", "app.db-shm"):
    if os.path.exists(os.path.join(here, f)):
        os.remove(os.path.join(here, f))
os.rename(db, os.path.join(here, "app-final.db"))
