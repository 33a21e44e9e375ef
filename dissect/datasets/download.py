"""Download Broden (Bau et al., CVPR 2017) and unpack it atomically: resumable, verified.

The zip is fetched with :mod:`urllib` into ``DEST/.broden1_<res>.zip.partial`` in chunks; an
interrupted transfer keeps what arrived and a rerun asks the server for the rest (an HTTP
``Range`` request). The finished zip is checked (its size against the server's, its SHA-256
when one is given, every member's CRC-32), then unpacked into a temporary folder inside
``DEST`` and renamed into place, so ``DEST/broden1_<res>`` is either a whole Broden or absent.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import logging
import os
import re
import secrets
import shutil
import stat
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from .._plumbing.progress import progress_bar
from ..errors import DataError

log = logging.getLogger(__name__)

OFFICIAL_URL = "http://netdissect.csail.mit.edu/data/broden1_{resolution}.zip"
"""Where the Broden authors publish the data (``resolution`` 224 or 227)."""
RESOLUTIONS = (224, 227)
CHUNK = 1 << 20  # bytes read and written at a time
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)\s*")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)\s*")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


class _Restart(Exception):
    """The partial file cannot be continued: download from byte 0."""


def download_broden(
    dest: str | Path,
    *,
    url: str | None = None,
    sha256: str | None = None,
    resolution: int = 224,
    keep_zip: bool = False,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download Broden's zip and unpack it into ``dest/broden1_<resolution>``.

    No official SHA-256 of the Broden zips is published. Without ``sha256=`` the download is
    verified by its size (the server's ``Content-Length`` / ``Content-Range``) and by the
    CRC-32 of every member of the zip, checked as it is extracted (what
    :meth:`zipfile.ZipFile.testzip` checks); the zip's SHA-256 is logged so that you can pin
    it (``sha256=`` / ``--sha256``) for the next machine. With ``sha256=`` a different file is
    refused.

    A transfer that stops (dropped connection, timeout) keeps the bytes received in
    ``dest/.broden1_<resolution>.zip.partial``; rerunning resumes from there with an HTTP
    ``Range`` request (a server that ignores it sends the whole file again). The zip is
    unpacked into a temporary folder inside ``dest`` and renamed into place: on any failure
    the temporary folder is removed and nothing half-unpacked is left.

    Parameters
    ----------
    dest
        The folder that receives ``broden1_<resolution>`` (created if missing).
    url
        Where to download the zip from (default: the official
        ``http://netdissect.csail.mit.edu/data/broden1_<resolution>.zip``; give a mirror when
        that host is down).
    sha256
        The expected SHA-256 of the zip, 64 hex digits (default: not checked; logged).
    resolution
        224 or 227: names the folder (and picks the official URL).
    keep_zip
        Keep ``dest/broden1_<resolution>.zip`` after unpacking (default: deleted). A zip left
        there is unpacked by the next call instead of being downloaded again.
    progress
        Show a progress bar (bytes).
    timeout
        Seconds to wait for the server to answer or send more data.

    Returns
    -------
    pathlib.Path
        ``dest/broden1_<resolution>``, the root to pass to :class:`~dissect.datasets.Broden`
        (``--dataset broden:PATH``). When it already holds an ``index.csv`` it is returned
        without downloading anything.

    Raises
    ------
    DataError
        One line naming the URL or the file: an unreachable URL (and why), an HTTP error
        status, an interrupted transfer (how many bytes were kept; rerun to resume), a
        wrong SHA-256 (both hashes; the file is removed), a truncated or corrupt zip, a zip
        member with an absolute path, ``..`` or a symbolic link, a zip without a Broden
        (``index.csv``) inside, or a ``dest/broden1_<resolution>`` that exists without one.
    """
    if resolution not in RESOLUTIONS:
        raise DataError(f"Broden comes at resolution 224 or 227, got {resolution!r}")
    if sha256 is not None:
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256.strip()):
            raise DataError(f"sha256 must be 64 hex digits, got {sha256!r}")
        sha256 = sha256.strip().lower()
    if not timeout > 0:
        raise DataError(f"timeout must be a positive number of seconds, got {timeout!r}")
    url = url or OFFICIAL_URL.format(resolution=resolution)
    dest = Path(dest).expanduser()
    name = f"broden1_{resolution}"
    target = dest / name
    if (target / "index.csv").is_file():
        log.info("Broden is already unpacked in %s; nothing downloaded", target)
        return target
    if target.exists() or target.is_symlink():
        raise DataError(f"{target} exists but holds no index.csv (not a whole Broden): remove "
                        "it, or choose another folder, and rerun")
    created = not dest.exists()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the folder {dest}: {exc.strerror or exc}") from exc
    try:
        _fetch_and_unpack(dest, name, url, sha256, keep_zip, progress, timeout)
    except BaseException:
        if created:  # a failure leaves no empty folder behind
            with contextlib.suppress(OSError):
                dest.rmdir()  # only when empty
        raise
    log.info("Broden unpacked in %s: use Broden(%r) or --dataset broden:%s", target,
             str(target), target)
    return target


def _fetch_and_unpack(dest: Path, name: str, url: str, sha256: str | None, keep_zip: bool,
                      progress: bool, timeout: float) -> None:
    """Download (or reuse) ``dest/<name>.zip``, check it and unpack it into ``dest/<name>``."""
    _remove_leftovers(dest, name)
    zip_path = dest / f"{name}.zip"
    if zip_path.is_file():
        log.info("unpacking %s, downloaded earlier (delete it to download again)", zip_path)
        source = str(zip_path)
    else:
        partial = dest / f".{name}.zip.partial"
        _download(url, partial, timeout, progress)
        source = url
        _verify_sha256(partial, sha256, url)
        os.replace(partial, zip_path)
        sha256 = None  # checked
    if sha256 is not None:
        _verify_sha256(zip_path, sha256, source)
    _unpack(zip_path, dest / name, source, progress)
    if not keep_zip:
        zip_path.unlink(missing_ok=True)


# ------------------------------------------------------------------ downloading


def _download(url: str, partial: Path, timeout: float, progress: bool) -> None:
    """Fetch ``url`` into ``partial``, continuing what it already holds."""
    for _ in range(2):
        try:
            _fetch(url, partial, timeout, progress)
            return
        except _Restart as why:
            log.info("%s; downloading %s from the start", why, url)
            partial.unlink(missing_ok=True)
    raise DataError(f"could not resume the download of {url}: the server answered a fresh "
                    f"request as if part were present; delete {partial} and rerun")


def _open(url: str, start: int, timeout: float):
    headers = {"User-Agent": "torch-dissect", "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                      timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:
            return exc  # handled by the caller: the partial file may be complete
        raise DataError(f"could not download {url}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise DataError(f"cannot reach {url}: {exc.reason}; check the address and the "
                        "connection, or give the URL of a mirror") from exc
    except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, bad answers
        raise DataError(f"cannot reach {url}: {exc or type(exc).__name__}") from exc
    except ValueError as exc:  # "unknown url type"
        raise DataError(f"cannot download {url!r}: {exc}") from exc


def _fetch(url: str, partial: Path, timeout: float, progress: bool) -> None:
    have = partial.stat().st_size if partial.is_file() else 0
    response = _open(url, have, timeout)
    with response:
        if isinstance(response, urllib.error.HTTPError):  # 416: nothing left to send?
            match = _UNSATISFIED_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if match and int(match.group(1)) == have:
                log.info("%s is already complete (%d bytes)", partial, have)
                return
            raise _Restart(f"the server cannot continue {partial} at byte {have}")
        status = response.status
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.strip().isdigit() else None
        if status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if match is None or int(match.group(1)) != have:
                raise _Restart(f"the server sent another range than bytes {have}- "
                               f"({response.headers.get('Content-Range')!r})")
            first, last, total = int(match.group(1)), int(match.group(2)), match.group(3)
            total = int(total) if total != "*" else None
            if (length is not None and length != last - first + 1) or (
                    total is not None and last + 1 != total):
                raise _Restart(f"the server's Content-Range {response.headers['Content-Range']}"
                               f" and Content-Length {length} disagree")
            log.info("resuming %s at byte %d", url, have)
        elif status in (200, None):  # None: a file:// URL (a copy on a local disk)
            if have:
                log.info("the server ignored the request to resume at byte %d; downloading "
                         "%s from the start", have, url)
            have, total = 0, length
        else:
            raise DataError(f"could not download {url}: HTTP {status} {response.reason}")
        _receive(response, url, partial, have, total, progress)


def _receive(response, url: str, partial: Path, have: int, total: int | None,
             progress: bool) -> None:
    """Append the response's body to ``partial`` (from byte ``have``) and check its size."""
    reason = ""
    bar = progress_bar(total=total, desc=f"downloading {url.rsplit('/', 1)[-1]}",
                       enabled=progress, unit="B", initial=have, outer=True, unit_scale=True)
    # read1 returns what has arrived: a stall or a drop keeps every byte received before it
    read = getattr(response, "read1", response.read)
    with bar, open(partial, "ab" if have else "wb") as f:
        while True:
            try:
                chunk = read(CHUNK)
            except (OSError, http.client.HTTPException) as exc:  # reset, timeout, cut short
                reason = f" ({type(exc).__name__}{': ' if str(exc) else ''}{exc})"
                break
            if not chunk:
                break
            f.write(chunk)  # a full disk is the OSError itself, naming the file
            bar.update(len(chunk))
    size = partial.stat().st_size
    if total is not None and size > total:
        partial.unlink()
        raise DataError(f"the server sent {size} bytes of {url}, more than the {total} it "
                        "announced; the file was removed: rerun to download it again")
    if reason or (total is not None and size < total):
        of = f" of {total}" if total is not None else ""
        raise DataError(f"the download of {url} stopped after {size}{of} bytes{reason}; the "
                        f"{size} bytes are kept in {partial}: rerun to resume")
    log.info("downloaded %s (%d bytes)", url, size)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _verify_sha256(path: Path, expected: str | None, source: str) -> None:
    """Check ``path`` against ``expected`` (removing it when it differs); log its SHA-256."""
    got = _sha256_of(path)
    if expected is None:
        log.info("SHA-256 of %s: %s (no official checksum is published; pin this one with "
                 "sha256= / --sha256)", source, got)
        return
    if got != expected:
        path.unlink(missing_ok=True)
        raise DataError(f"{source}: the downloaded file has SHA-256 {got}, expected {expected}; "
                        f"{path} was removed (check the URL and --sha256, then rerun)")
    log.info("SHA-256 of %s checked: %s", source, got)


# ------------------------------------------------------------------ unpacking


def _remove_leftovers(dest: Path, name: str) -> None:
    """Remove temporary folders a killed run left (a normal failure removes its own)."""
    for old in dest.glob(f".{name}.unpacking-*"):
        if old.is_dir() and not old.is_symlink():
            log.info("removing %s, left by an unpacking that was killed", old)
            shutil.rmtree(old, ignore_errors=True)


def _member_path(info: zipfile.ZipInfo, zip_path: Path) -> PurePosixPath:
    """The member's relative path, refused when it could land outside the folder."""
    name = info.filename.replace("\\", "/")
    path = PurePosixPath(name)
    mode = info.external_attr >> 16
    if (path.is_absolute() or ".." in path.parts or re.match(r"[A-Za-z]:", name)
            or "\0" in name):
        raise DataError(f"{zip_path} holds a member with an unsafe path {info.filename!r} "
                        "(absolute or with '..'); refused: this is not a Broden zip")
    if stat.S_ISLNK(mode):
        raise DataError(f"{zip_path} holds a symbolic link {info.filename!r}; refused: this is "
                        "not a Broden zip")
    return path


def _extract(zip_path: Path, into: Path, progress: bool) -> None:
    """Extract every member (regular files and folders only), checking each CRC-32."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = archive.infolist()
            paths = [_member_path(info, zip_path) for info in members]
            need = sum(info.file_size for info in members)
            free = shutil.disk_usage(into).free
            if need > free:
                raise OSError(errno.ENOSPC, f"unpacking {zip_path} needs {need} bytes but only "
                              f"{free} are free there: free some space and rerun", str(into))
            bar = progress_bar(total=need, desc=f"unpacking {zip_path.name}", enabled=progress,
                               unit="B", outer=True, unit_scale=True)
            with bar:
                for info, path in zip(members, paths, strict=True):
                    out = into.joinpath(*path.parts) if path.parts else into
                    if info.is_dir():
                        out.mkdir(parents=True, exist_ok=True)
                        continue
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with archive.open(info) as src, open(out, "xb") as dst:
                        shutil.copyfileobj(src, dst, CHUNK)  # reading to the end checks CRC-32
                    bar.update(info.file_size)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError,
            zipfile.LargeZipFile, FileExistsError, UnicodeDecodeError) as exc:
        raise DataError(f"{zip_path} is truncated or corrupt ({type(exc).__name__}: {exc}); "
                        "it was removed: rerun to download it again") from exc


def _broden_root(folder: Path) -> Path | None:
    """The Broden inside an unpacked zip: the folder itself or its one top folder."""
    if (folder / "index.csv").is_file():
        return folder
    entries = list(folder.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / "index.csv").is_file():
        return entries[0]
    return None


def _unpack(zip_path: Path, target: Path, source: str, progress: bool) -> None:
    """Unpack ``zip_path`` into a temporary folder beside ``target``, then rename it."""
    from .broden import Broden

    while True:  # not tempfile.mkdtemp: its mode 0700 would be the Broden folder's
        tmp = target.parent / f".{target.name}.unpacking-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            break
        except FileExistsError:
            continue
    try:
        try:
            _extract(zip_path, tmp, progress)
            root = _broden_root(tmp)
            if root is None:
                raise DataError(f"{zip_path} (from {source}) holds no Broden: no index.csv at "
                                "its top or in its one top folder; it was removed")
            try:
                Broden(root)  # its CSV files read and checked before it is moved into place
            except DataError as exc:
                raise DataError(f"{zip_path} (from {source}) holds a damaged Broden; it was "
                                f"removed: {exc}") from exc
        except DataError:
            zip_path.unlink(missing_ok=True)  # a rerun downloads it again
            raise
        os.replace(root, target)
        log.info("unpacked %s into %s", zip_path, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
