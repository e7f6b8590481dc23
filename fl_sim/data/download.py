"""MovieLens archives from GroupLens, checksum verified, unpacked into a cache folder."""

from __future__ import annotations

import hashlib
import shutil
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fl_sim.errors import DataError


@dataclass(frozen=True)
class Archive:
    url: str
    md5: str
    folder: str  # top folder inside the zip
    member: str  # the ratings file inside that folder


ARCHIVES = {
    "ml100k": Archive("https://files.grouplens.org/datasets/movielens/ml-100k.zip",
                      "0e33842e24a9c977be4e0107933c0723", "ml-100k", "u.data"),
    "ml1m": Archive("https://files.grouplens.org/datasets/movielens/ml-1m.zip",
                    "c4d9eecfca2ab87c1945afe126590906", "ml-1m", "ratings.dat"),
}


def md5sum(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def fetch(name: str, cache_dir: Path, url: str | None = None, timeout_s: float = 30.0) -> Path:
    """Return the unpacked folder of archive `name`, downloading it into `cache_dir` if needed."""
    archive = ARCHIVES[name]
    url = url or archive.url
    dest = Path(cache_dir).expanduser() / "downloads"
    target = dest / archive.folder / archive.member
    if target.exists():
        return target.parent
    dest.mkdir(parents=True, exist_ok=True)
    zip_path = dest / f"{archive.folder}.zip"
    partial = zip_path.with_suffix(".zip.part")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out)
    except (urllib.error.URLError, OSError) as exc:
        partial.unlink(missing_ok=True)
        raise DataError(
            f"cannot download {url} ({getattr(exc, 'reason', exc)}). Offline? Download "
            f"{archive.folder}.zip by hand and unpack it so that {target} exists, "
            f"or point dataset.path= at your copy of {archive.member}"
        ) from None
    got = md5sum(partial)
    if got != archive.md5:
        partial.unlink(missing_ok=True)
        raise DataError(f"checksum mismatch for {url}: md5 {got}, expected {archive.md5}; the file was discarded")
    partial.replace(zip_path)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(dest)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{zip_path}: not a valid zip archive ({exc})") from None
    if not target.exists():
        raise DataError(f"{zip_path} does not contain {archive.folder}/{archive.member}")
    return target.parent
