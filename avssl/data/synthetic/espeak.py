"""espeak-ng through ctypes (library and voices from espeakng-loader): waveform + phoneme timing.

espeak-ng keeps global state, so there is one synthesizer per process (`Espeak.instance()`).
Its output is made reproducible: voice variants get `flutter 0` (espeak-ng's pitch flutter runs
on a counter that carries over between utterances), the voice is reloaded and the random seeds
set before each utterance, and the last bit of
state that carries over is settled by speaking each utterance twice and keeping the second.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import tempfile
import threading
from pathlib import Path
from dataclasses import dataclass
from typing import Optional

import numpy as np

from avssl.errors import AvsslError

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 1
_EVENT_LIST_TERMINATED = 0
_EVENT_PHONEME = 7
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_PARAMS = {"rate": 1, "volume": 2, "pitch": 3, "range": 4, "wordgap": 7}


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@dataclass
class Utterance:
    wave: np.ndarray  # int16 at `sample_rate`
    sample_rate: int
    phonemes: list[tuple[int, str]]  # (start sample, espeak phoneme mnemonic)


def _reproducible_data_dir(source: Path) -> Path:
    """A private copy of espeak-ng's data (symlinks) whose voice variants have no pitch flutter."""
    root = Path(tempfile.mkdtemp(prefix="avssl-espeak-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    for entry in source.iterdir():
        if entry.name != "voices":
            os.symlink(entry, root / entry.name)
    (root / "voices").mkdir()
    for entry in (source / "voices").iterdir():
        if entry.name != "!v":
            os.symlink(entry, root / "voices" / entry.name)
    variants = root / "voices" / "!v"
    variants.mkdir()
    for entry in (source / "voices" / "!v").iterdir():
        if entry.is_file():
            text = entry.read_text(errors="replace")
            (variants / f"{STEADY_PREFIX}{entry.name}").write_text(text.rstrip("\n") + "\nflutter 0\n")
    (variants / f"{STEADY_PREFIX}plain").write_text("language variant\nname plain\nflutter 0\n")
    return root


STEADY_PREFIX = "avssl_"


class Espeak:
    _instance: Optional["Espeak"] = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as e:  # pragma: no cover - declared dependency
            raise AvsslError("espeakng-loader is not installed; `pip install espeakng-loader`") from e
        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self._libc = ctypes.CDLL(None)
        self.data_dir = _reproducible_data_dir(Path(espeakng_loader.get_data_path()))
        self._chunks: list[np.ndarray] = []
        self._phonemes: list[tuple[int, str]] = []
        self._cb = _Callback(self._on_audio)  # keep a reference: ctypes would free it
        rate = self.lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, str(self.data_dir).encode(), _INITIALIZE_PHONEME_EVENTS
        )
        if rate <= 0:
            raise AvsslError("espeak-ng failed to initialise (voice data not found?)")
        self.sample_rate = int(rate)
        self.lib.espeak_SetSynthCallback(self._cb)

    @classmethod
    def instance(cls) -> "Espeak":
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _on_audio(self, wav, n, events) -> int:  # type: ignore[no-untyped-def]
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            ev = events[i]
            if ev.type == _EVENT_PHONEME:
                name = ev.id.string.decode("utf8", "replace").replace("'", "").replace(",", "")
                self._phonemes.append((int(ev.sample), name))
            i += 1
        return 0

    def steady_voice(self, voice: str) -> str:
        base, _, variant = voice.partition("+")
        return f"{base}+{STEADY_PREFIX}{variant or 'plain'}"

    def _speak(self, text: str) -> None:
        self._chunks, self._phonemes = [], []
        buf = text.encode("utf8") + b"\0"
        self.lib.espeak_Synth(buf, len(buf), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        self.lib.espeak_Synchronize()

    def synth(self, text: str, voice: str, rate: float, pitch: float, prange: float, volume: float) -> Utterance:
        """Same arguments, same waveform, whatever was synthesized before in this process."""
        with self._lock:
            for _ in range(2):  # the first pass leaves the synthesizer in a state set by this text alone
                if self.lib.espeak_SetVoiceByName(self.steady_voice(voice).encode()) != 0:
                    raise AvsslError(f"espeak-ng has no voice '{voice}'")
                self._libc.srand(1)
                self.lib.espeak_ng_SetRandSeed(1)
                for key, value in (("rate", rate), ("pitch", pitch), ("range", prange), ("volume", volume)):
                    self.lib.espeak_SetParameter(_PARAMS[key], int(round(value)), 0)
                self._speak(text)
            wave = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
            return Utterance(wave=wave, sample_rate=self.sample_rate, phonemes=list(self._phonemes))
