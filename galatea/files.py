"""Writing output files so that an interrupted run never leaves a plausible broken one: each file
is written under a hidden temporary name in its folder and renamed when complete; on any
failure the temporary file is removed, and a full disk or Ctrl-C ends with one clear line."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeVar

from galatea.errors import GalateaError

T = TypeVar("T")


def write_then_rename(final: Path, write: Callable[[Path], T], durable: bool = False) -> T:
    """`write(tmp)` creates the file at a hidden temporary path; it is renamed to `final` when
    complete. `durable` fsyncs it first, so the name never points at data still in flight."""
    tmp = final.with_name(f".{final.name}.partial")
    try:
        result = write(tmp)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        tmp.replace(final)
        return result
    except KeyboardInterrupt:
        tmp.unlink(missing_ok=True)
        raise GalateaError(f"interrupted while writing {final.name}; its partial file was removed (files finished "
                           "before it are complete); run the command again with --force") from None
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise GalateaError(f"{final.parent}: disk full while writing {final.name}; its partial file was "
                               "removed; free some space or choose another destination") from None
        raise GalateaError(f"{final}: cannot write ({e.strerror or e})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(final: Path, body: Callable[[IO[bytes]], T], durable: bool = False) -> T:
    """Write `final` through `body(file)`, as `write_then_rename` does."""
    def write(tmp: Path) -> T:
        with open(tmp, "wb") as f:
            return body(f)
    return write_then_rename(final, write, durable)
