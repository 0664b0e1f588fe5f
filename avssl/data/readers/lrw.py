"""LRW: WORD/{train,val,test}/WORD_00001.mp4, 25 fps face video with its audio track, 500 words."""

from __future__ import annotations

from typing import Iterator, Union

from avssl.data.corpus import Clip, fit_to_frames
from avssl.data.media import read_video
from avssl.data.readers.base import READERS, Item, Reader, Skip

SPLITS = ("train", "val", "test")


@READERS.register("lrw")
class LRW(Reader):
    name = "lrw"
    layout = "WORD/{train,val,test}/WORD_00001.mp4"
    has_video = True

    def items(self) -> Iterator[Union[Item, Skip]]:
        words = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        self.labels = {"word": words}
        for word in words:
            for split in SPLITS:
                for path in sorted((self.root / word / split).glob("*.mp4")):
                    if not path.stem.startswith(f"{word}_"):
                        yield Skip(path, "unknown_label", f"{path}: file name does not start with its word folder '{word}_'")
                        continue
                    # LRW has no speaker ids; its published splits are disjoint in broadcast time.
                    yield Item(f"lrw_{split}_{path.stem}", path, f"lrw_{split}", split, {"word": word})

    def load(self, item: Item) -> Clip:
        frames, audio = read_video(item.path, tuple(self.cfg.frame_size), tuple(self.cfg.face_crop))
        audio, frames = fit_to_frames(audio, frames)
        return Clip(item.clip_id, item.split or "train", item.speaker, audio, frames=frames, labels=dict(item.labels), source=self.rel(item.path))
