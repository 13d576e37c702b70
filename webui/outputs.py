"""Saving generated images: `<outputs>/<tab>/<date>/NNNNN-<seed>.png` with their infotext,
written atomically (temporary file, then rename) so a crash never leaves half a file."""

from __future__ import annotations

import datetime as dt
import os
import re
import threading
from pathlib import Path

from PIL import Image

from webui.settings import check_filename_pattern

_NUMBERED = re.compile(r"^(\d+)")
_UNSAFE = re.compile(r"[^\w\-. ,()\[\]+=]+")


def _safe(text: str, limit: int = 80) -> str:
    text = _UNSAFE.sub("_", text).strip(" ._")
    return text[:limit] or "_"


class OutputWriter:
    """Writes the images of every tab. Thread-safe: numbers in a folder never repeat."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    @staticmethod
    def folder(root: Path, tab: str, when: dt.datetime | None = None) -> Path:
        when = when or dt.datetime.now()
        return Path(root) / _safe(tab) / when.strftime("%Y-%m-%d")

    @staticmethod
    def next_number(folder: Path) -> int:
        """One more than the highest leading number of a file in `folder` (A1111's rule)."""
        highest = -1
        if folder.is_dir():
            for entry in os.scandir(folder):
                m = _NUMBERED.match(entry.name)
                if m and not entry.name.startswith("."):
                    highest = max(highest, int(m.group(1)))
        return highest + 1

    def save(
        self,
        images: list[Image.Image],
        infotexts: list[str],
        records: list[dict],
        *,
        root: Path,
        tab: str,
        pattern: str = "[number]-[seed]",
        prompt: str = "",
    ) -> list[Path]:
        """Save each image as PNG with its infotext; returns the paths written."""
        check_filename_pattern(pattern)
        now = dt.datetime.now()
        folder = self.folder(root, tab, now)
        paths = []
        with self._lock:
            folder.mkdir(parents=True, exist_ok=True)
            number = self.next_number(folder)
            from ldm_core.infotext import save_png_with_infotext

            for image, text, record in zip(images, infotexts, records, strict=True):
                name = self._filename(pattern, number, record, prompt, now)
                path = folder / f"{name}.png"
                suffix = 1
                while path.exists():
                    path = folder / f"{name}-{suffix}.png"
                    suffix += 1
                save_png_with_infotext(image, path, text)
                paths.append(path)
                number += 1
        return paths

    @staticmethod
    def _filename(pattern: str, number: int, record: dict, prompt: str, now: dt.datetime) -> str:
        values = {
            "number": f"{number:05d}",
            "seed": str(record.get("Seed", "")),
            "date": now.strftime("%Y-%m-%d"),
            "time": now.strftime("%H-%M-%S"),
            "datetime": now.strftime("%Y%m%d%H%M%S"),
            "model_name": str(record.get("Model", "")),
            "model_hash": str(record.get("Model hash", "")),
            "sampler": str(record.get("Sampler", "")),
            "steps": str(record.get("Steps", "")),
            "cfg": str(record.get("CFG scale", "")),
            "width": str(record.get("Size", "x")).split("x")[0],
            "height": str(record.get("Size", "x")).split("x")[-1],
            "prompt_words": " ".join(re.findall(r"[\w]+", prompt)[:8]),
        }
        name = re.sub(r"\[([a-z_]+)\]", lambda m: _safe(values[m.group(1)], 60), pattern)
        return _safe(name, 150)
