"""RAVDESS speech: Actor_NN/03-01-EE-II-SS-RR-AA.wav, 24 actors, 8 emotions."""

from __future__ import annotations

from typing import Iterator, Union

from avssl.data.corpus import Clip, fit_to_frames
from avssl.data.media import read_audio
from avssl.data.readers.base import READERS, Item, Reader, Skip

EMOTIONS = {
    "01": "neutral", "02": "calm", "03": "happy", "04": "sad",
    "05": "anger", "06": "fear", "07": "disgust", "08": "surprise",
}
STATEMENTS = {"01": "Kids are talking by the door", "02": "Dogs are sitting by the door"}


@READERS.register("ravdess")
class Ravdess(Reader):
    name = "ravdess"
    layout = "Actor_NN/03-01-EE-II-SS-RR-AA.wav"
    labels = {"emotion": sorted(EMOTIONS.values())}

    def items(self) -> Iterator[Union[Item, Skip]]:
        for path in sorted(self.root.glob("Actor_*/*.wav")):
            parts = path.stem.split("-")
            if len(parts) != 7 or not all(p.isdigit() for p in parts):
                yield Skip(path, "bad_filename", f"{path.name}: expected MM-VV-EE-II-SS-RR-AA.wav")
                continue
            modality, channel, emo, intensity, statement, rep, actor = parts
            if channel != "01":
                yield Skip(path, "not_speech", f"{path.name}: vocal channel {channel} is song, not speech")
                continue
            if emo not in EMOTIONS:
                yield Skip(path, "unknown_label", f"{path.name}: emotion code '{emo}' is not one of {', '.join(EMOTIONS)}")
                continue
            labels = {
                "emotion": EMOTIONS[emo],
                "intensity": 1.0 if intensity == "02" else 0.5,
                "text": STATEMENTS.get(statement, statement),
            }
            yield Item(f"ravdess_{path.stem}", path, f"actor{actor}", None, labels)

    def load(self, item: Item) -> Clip:
        audio, _ = fit_to_frames(read_audio(item.path))
        return Clip(item.clip_id, item.split or "train", item.speaker, audio, labels=dict(item.labels), source=self.rel(item.path))
