"""Speech Commands: WORD/<speaker>_nohash_<n>.wav with validation_list.txt and testing_list.txt."""

from __future__ import annotations

from typing import Iterator, Union

from avssl.data.corpus import Clip, fit_to_frames
from avssl.data.media import read_audio
from avssl.data.readers.base import READERS, Item, Reader, Skip


def _read_list(path) -> set[str]:
    return {ln.strip() for ln in path.read_text().splitlines() if ln.strip()} if path.is_file() else set()


@READERS.register("speech-commands")
class SpeechCommands(Reader):
    name = "speech-commands"
    layout = "WORD/<speaker>_nohash_<n>.wav + validation_list.txt + testing_list.txt"

    def items(self) -> Iterator[Union[Item, Skip]]:
        val, test = _read_list(self.root / "validation_list.txt"), _read_list(self.root / "testing_list.txt")
        words = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("_"))
        self.labels = {"word": words}
        for word in words:
            for path in sorted((self.root / word).glob("*.wav")):
                rel = f"{word}/{path.name}"
                if "_nohash_" not in path.stem:
                    yield Skip(path, "bad_filename", f"{rel}: expected <speaker>_nohash_<n>.wav")
                    continue
                speaker = path.stem.split("_nohash_")[0]
                split = "test" if rel in test else "val" if rel in val else "train"
                yield Item(f"sc_{word}_{path.stem}", path, speaker, split, {"word": word})

    def load(self, item: Item) -> Clip:
        audio, _ = fit_to_frames(read_audio(item.path))
        return Clip(item.clip_id, item.split or "train", item.speaker, audio, labels=dict(item.labels), source=self.rel(item.path))
