"""IEMOCAP: SessionN/dialog/EmoEvaluation/*.txt + SessionN/sentences/wav/<dialog>/<utterance>.wav.

Four classes as usual (excited merged into happy); arousal and valence from the dimensional
ratings (1..5, mapped to -1..1). Sessions 1-3 train, 4 validation, 5 test.
"""

from __future__ import annotations

import re
from typing import Iterator, Union

from avssl.data.corpus import Clip, fit_to_frames
from avssl.data.media import read_audio
from avssl.data.readers.base import READERS, Item, Reader, Skip

CATEGORIES = {"neu": "neutral", "hap": "happy", "exc": "happy", "ang": "anger", "sad": "sad"}
LINE = re.compile(r"^\[(?P<start>[\d.]+) - (?P<end>[\d.]+)\]\s+(?P<utt>\S+)\s+(?P<cat>\S+)\s+\[(?P<v>[\d.]+), (?P<a>[\d.]+), (?P<d>[\d.]+)\]")
SESSION_SPLIT = {1: "train", 2: "train", 3: "train", 4: "val", 5: "test"}


@READERS.register("iemocap")
class Iemocap(Reader):
    name = "iemocap"
    layout = "SessionN/dialog/EmoEvaluation/*.txt and SessionN/sentences/wav/<dialog>/<utterance>.wav"
    labels = {"emotion": sorted(set(CATEGORIES.values()))}

    def items(self) -> Iterator[Union[Item, Skip]]:
        for session_dir in sorted(self.root.glob("Session[1-5]")):
            session = int(session_dir.name[-1])
            for ev_file in sorted((session_dir / "dialog" / "EmoEvaluation").glob("*.txt")):
                dialog = ev_file.stem
                for line in ev_file.read_text(errors="replace").splitlines():
                    m = LINE.match(line.strip())
                    if not m:
                        continue
                    utt = m["utt"]
                    wav = session_dir / "sentences" / "wav" / dialog / f"{utt}.wav"
                    if m["cat"] not in CATEGORIES:
                        yield Skip(wav, "label_not_in_task", f"{utt}: category '{m['cat']}' is outside the 4-class task")
                        continue
                    if not wav.is_file():
                        yield Skip(wav, "missing_media", f"{wav}: labelled in {ev_file.name} but the wav is missing")
                        continue
                    gender = utt.split("_")[-1][0]
                    labels = {
                        "emotion": CATEGORIES[m["cat"]],
                        "valence": (float(m["v"]) - 3.0) / 2.0,
                        "arousal": (float(m["a"]) - 3.0) / 2.0,
                    }
                    yield Item(utt, wav, f"Ses{session:02d}{gender}", SESSION_SPLIT[session], labels)

    def load(self, item: Item) -> Clip:
        audio, _ = fit_to_frames(read_audio(item.path))
        return Clip(item.clip_id, item.split or "train", item.speaker, audio, labels=dict(item.labels), source=self.rel(item.path))
