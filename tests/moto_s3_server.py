"""moto's standalone S3 server with S3's conditional writes made atomic, as tests/s3.py runs it.

moto answers ``PutObject`` with ``If-None-Match: *`` (or ``If-Match``) by looking the key up and
then writing it, two steps with no lock between them, on a threaded server: two concurrent
conditional creates of one key can both succeed. S3 itself makes a conditional write atomic (one
wins, the others get 412, or 409 while a conflicting write is in flight), and the registry's
version claims rely on exactly that. A clean-clone CI run on 2026-12-08 hit moto's gap: its log
shows two ``PUT .../versions/v0006/.claim`` answered 200, and two publishers wrote one version.
Here every ``PutObject`` runs under one lock, which restores S3's contract; everything else is
moto as shipped.

    python tests/moto_s3_server.py -H 127.0.0.1 -p PORT   (the arguments of ``moto_server``)
"""

from __future__ import annotations

import threading

from moto.s3.responses import S3Response
from moto.server import main

_WRITES = threading.Lock()
_put_object = S3Response.put_object


def _atomic_put_object(self):
    with _WRITES:
        return _put_object(self)


S3Response.put_object = _atomic_put_object

if __name__ == "__main__":
    main()
