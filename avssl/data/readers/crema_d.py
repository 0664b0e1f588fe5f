"""CREMA-D: AudioWAV/<actor>_<sentence>_<emotion>_<level>.wav, 91 actors, 6 emotions."""

from __future__ import annotations

from typing import Iterator, Union

from avssl.data.corpus import Clip, fit_to_frames
from avssl.data.media import read_audio
from avssl.data.readers.base import READERS, Item, Reader, Skip

EMOTIONS = {"ANG": "anger", "DIS": "disgust", "FEA": "fear", "HAP": "happy", "NEU": "neutral", "SAD": "sad"}
LEVELS = {"LO": 0.33, "MD": 0.66, "HI": 1.0, "XX": None, "X": None}
SENTENCES = {
    "IEO": "It's eleven o'clock",
    "TIE": "That is exactly what happened",
    "IOM": "I'm on my way to the meeting",
    "IWW": "I wonder what this is about",
    "TAI": "The airplane is almost full",
    "MTI": "Maybe tomorrow it will be cold",
    "IWL": "I would like a new alarm clock",
    "ITH": "I think I have a doctor's appointment",
    "DFA": "Don't forget a jacket",
    "ITS": "I think I've seen this before",
    "TSI": "The surface is slick",
    "WSI": "We'll stop in a couple of minutes",
}


@READERS.register("crema-d")
class CremaD(Reader):
    name = "crema-d"
    layout = "AudioWAV/1001_DFA_ANG_XX.wav"
    labels = {"emotion": sorted(EMOTIONS.values())}

    def items(self) -> Iterator[Union[Item, Skip]]:
        folder = self.root / "AudioWAV"
        for path in sorted(folder.glob("*.wav")) if folder.is_dir() else []:
            parts = path.stem.split("_")
            if len(parts) != 4 or not parts[0].isdigit():
                yield Skip(path, "bad_filename", f"{path.name}: expected ACTOR_SENTENCE_EMOTION_LEVEL.wav")
                continue
            actor, sentence, emo, level = parts
            if emo not in EMOTIONS:
                yield Skip(path, "unknown_label", f"{path.name}: emotion code '{emo}' is not one of {', '.join(EMOTIONS)}")
                continue
            labels = {"emotion": EMOTIONS[emo], "text": SENTENCES.get(sentence, sentence)}
            if LEVELS.get(level) is not None:
                labels["intensity"] = LEVELS[level]
            yield Item(path.stem, path, f"crema{actor}", None, labels)

    def load(self, item: Item) -> Clip:
        audio, _ = fit_to_frames(read_audio(item.path))
        return Clip(item.clip_id, item.split or "train", item.speaker, audio, labels=dict(item.labels), source=self.rel(item.path))
