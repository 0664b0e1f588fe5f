"""Synthetic talking-face speech: the offline default corpus.

What it is: espeak-ng speech (voices and variants as speakers, prosody as emotion) with a drawn
face whose mouth follows espeak-ng's phoneme timing and the audio loudness, and whose brows,
eyes and mouth corners show the emotion at a per-clip intensity that drifts over the clip.
Each clip is a short carrier phrase around one target word. Labels come for free.

What it is not: natural speech or real faces. Emotion lives in a handful of prosody parameters
and a few drawn features, so absolute accuracies say little about real corpora; the corpus is
for checking that the pipeline works and that methods can be told apart.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Optional

import numpy as np

from avssl.config.schema import EMOTIONS, SynthConfig
from avssl.data.constants import FPS, HOP, SAMPLE_RATE
from avssl.data.corpus import Clip, CorpusWriter, clip_row, write_shard
from avssl.data.synthetic.face import FaceIdentity, blend_expression, draw_face, viseme
from avssl.progress import Progress

# Prosody offsets at full emotion intensity, in espeak-ng units
# (rate: words/min, pitch and range: 0-99, volume: 0-200).
EMOTION_PROSODY: dict[str, dict[str, float]] = {
    "neutral": dict(rate=0, pitch=0, prange=0, volume=0),
    "happy": dict(rate=15, pitch=12, prange=25, volume=15),
    "anger": dict(rate=25, pitch=4, prange=15, volume=50),
    "fear": dict(rate=40, pitch=20, prange=-20, volume=-15),
    "sad": dict(rate=-35, pitch=-12, prange=-25, volume=-30),
    "disgust": dict(rate=-20, pitch=-8, prange=8, volume=5),
}
# Voice quality at full intensity: spectral tilt (+ brighter, tense voice; - darker, lax voice).
EMOTION_TILT: dict[str, float] = {"neutral": 0.0, "happy": 0.5, "anger": 0.9, "fear": 0.4, "sad": -0.8, "disgust": -0.35}
# Circumplex position of each emotion: (arousal, valence) in [-1, 1].
AFFECT: dict[str, tuple[float, float]] = {
    "neutral": (0.0, 0.0),
    "happy": (0.55, 0.8),
    "anger": (0.8, -0.6),
    "fear": (0.7, -0.5),
    "sad": (-0.55, -0.6),
    "disgust": (0.3, -0.7),
}
VOCABULARIES: dict[str, list[str]] = {
    # 18 minimal pairs; several differ only in voicing (p/b, t/d, f/v), which lips cannot show.
    "minimal_pairs": [
        "bat", "pat", "cap", "cab", "pin", "bin", "tin", "din", "fan", "van", "sip", "zip",
        "coat", "goat", "seat", "sheet", "three", "tree", "thin", "sin", "map", "mat", "bed", "bad",
        "ship", "chip", "light", "right", "fine", "vine", "rope", "robe", "cold", "gold", "time", "dime",
    ],
    "digits": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
    # Ten Speech-Commands-style command words.
    "commands": ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"],
    # The pretraining pool's broad vocabulary (LRW-like: many words, none of the command words).
    "broad": [
        "about", "after", "again", "against", "also", "always", "another", "around", "away", "back",
        "because", "before", "being", "better", "between", "black", "board", "book", "both", "bring",
        "call", "change", "child", "city", "close", "come", "could", "country", "day", "during",
        "early", "east", "enough", "even", "every", "face", "family", "father", "feel", "few",
        "find", "first", "follow", "food", "force", "friend", "game", "give", "great", "group",
        "hand", "happen", "heart", "help", "high", "home", "house", "idea", "important", "just",
        "keep", "kind", "know", "large", "later", "leave", "life", "little", "live", "long",
        "made", "many", "matter", "maybe", "money", "month", "morning", "mother", "music", "never",
        "number", "often", "other", "paper", "people", "place", "point", "power", "problem", "question",
        "really", "reason", "school", "should", "small", "something", "still", "story", "system", "today",
        "under", "until", "water", "where", "while", "world", "would", "young",
    ],
}
# Distinct voices: base i % 7 with variant (5 i + 3) % 12 is one-to-one over 84 global speaker indices.
MAX_SPEAKERS = 84
CARRIERS = ["say {} again", "{} is next", "the word is {}", "I said {}", "{} please", "now {}"]
# en-gb-scotland is left out: its trilled r is not reproducible from call to call.
VOICE_BASES = ["en-us", "en", "en-gb-x-rp", "en-029", "en-gb-x-gbcwmd", "en-gb-x-gbclan", "en-us-nyc"]
VOICE_VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5"]


@dataclass(frozen=True)
class Speaker:
    index: int
    name: str
    split: str
    voice: str
    rate: float
    pitch: float
    prange: float
    volume: float
    face: FaceIdentity


def make_speakers(cfg: SynthConfig, seed: int) -> list[Speaker]:
    """The corpus's speakers: global indices speaker_offset .. speaker_offset + speakers - 1, each with its
    own voice, prosody and face (drawn from the global index, so corpora with disjoint ranges share none)."""
    order = np.random.default_rng([seed, 7] + ([cfg.speaker_offset] if cfg.speaker_offset else [])).permutation(cfg.speakers)
    n_train = max(1, int(round(cfg.split[0] * cfg.speakers)))
    n_val = max(1, int(round(cfg.split[1] * cfg.speakers)))
    if n_train + n_val >= cfg.speakers:
        n_train = cfg.speakers - n_val - 1
    split_of = {}
    for rank, idx in enumerate(order):
        split_of[int(idx)] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    speakers = []
    for k in range(cfg.speakers):
        i = cfg.speaker_offset + k
        r = np.random.default_rng([seed, 1, i])
        speakers.append(
            Speaker(
                index=i,
                name=f"spk{i:02d}",
                split=split_of[k],
                voice=f"{VOICE_BASES[i % len(VOICE_BASES)]}+{VOICE_VARIANTS[(i * 5 + 3) % len(VOICE_VARIANTS)]}",
                rate=float(r.uniform(150, 190)),
                pitch=float(r.uniform(35, 65)),
                prange=float(r.uniform(35, 65)),
                volume=float(r.uniform(80, 120)),
                face=FaceIdentity.sample(r),
            )
        )
    return speakers


@lru_cache(maxsize=4)
def _resample_kernel(orig: int, new: int, zero_crossings: int = 6, rolloff: float = 0.99) -> tuple[np.ndarray, int]:
    """Windowed-sinc polyphase kernel [new, K] for orig -> new (both divided by their gcd)."""
    base = min(orig, new) * rolloff
    width = int(np.ceil(zero_crossings * orig / base))
    idx = np.arange(-width, width + orig, dtype=np.float64)[None, :] / orig
    t = idx - (np.arange(new, dtype=np.float64)[:, None] / new)
    t = np.clip(t * base, -zero_crossings, zero_crossings)
    window = np.cos(t * np.pi / zero_crossings / 2) ** 2
    kernel = np.sinc(t) * window * base / orig
    return kernel.astype(np.float32), width


def resample_int16(wave: np.ndarray, sr: int) -> np.ndarray:
    """int16 audio at `sr` -> float32 at 16 kHz (band-limited, as torchaudio's sinc resampling)."""
    x = wave.astype(np.float32) / 32768.0
    if sr == SAMPLE_RATE:
        return x
    g = int(np.gcd(SAMPLE_RATE, sr))
    orig, new = sr // g, SAMPLE_RATE // g
    kernel, width = _resample_kernel(orig, new)
    padded = np.pad(x, (width, width + orig))
    frames = np.lib.stride_tricks.sliding_window_view(padded, kernel.shape[1])[::orig]
    out = (frames @ kernel.T).reshape(-1)
    return out[: int(np.ceil(new * len(x) / orig))].astype(np.float32)


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spec), dtype=np.float64)
    f[0] = 1.0
    x = np.fft.irfft(spec / np.sqrt(f), n)
    return (x / (x.std() + 1e-12)).astype(np.float32)


def add_noise_at_snr(x: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    p_signal = float((x**2).mean()) + 1e-12
    p_noise = float((noise**2).mean()) + 1e-12
    return (x + noise * np.sqrt(p_signal / (p_noise * 10 ** (snr_db / 10)))).astype(np.float32)


def spectral_tilt(x: np.ndarray, tilt: float) -> np.ndarray:
    """tilt > 0: first-order pre-emphasis (brighter); tilt < 0: one-pole low-pass (darker)."""
    if tilt > 0:
        a = min(0.95, 0.9 * tilt)
        y = x.copy()
        y[1:] -= a * x[:-1]
        return y / (1.0 - 0.5 * a)
    if tilt < 0:  # (1 - b) / (1 - b z^-1), applied in the frequency domain with room for its tail
        b = min(0.95, -0.9 * tilt)
        n = len(x) + 1024
        w = np.fft.rfftfreq(n) * 2 * np.pi
        h = (1.0 - b) / (1.0 - b * np.exp(-1j * w))
        return np.fft.irfft(np.fft.rfft(x, n) * h, n)[: len(x)].astype(np.float32)
    return x


def _smooth_curve(n: int, rng: np.random.Generator, knots: int = 4) -> np.ndarray:
    """A slow random curve in [0, 1] over n frames."""
    pts = rng.uniform(0, 1, knots)
    return np.interp(np.linspace(0, knots - 1, n), np.arange(knots), pts)


def make_clip(cfg: SynthConfig, speaker: Speaker, clip_index: int, seed: int, render: bool = True) -> Clip:
    rng = np.random.default_rng([seed, 2, speaker.index, clip_index])
    vocab = VOCABULARIES[cfg.vocabulary]
    emotion = EMOTIONS[(clip_index + speaker.index) % len(EMOTIONS)]
    word = vocab[int(rng.integers(len(vocab)))]
    text = CARRIERS[int(rng.integers(len(CARRIERS)))].format(word)
    intensity = float(rng.uniform(0.4, 1.0)) * cfg.emotion_strength
    emo = EMOTION_PROSODY[emotion]
    j = cfg.jitter
    rate = speaker.rate + intensity * emo["rate"] + j * rng.normal(0, 10)
    pitch = speaker.pitch + intensity * emo["pitch"] + j * rng.normal(0, 6)
    prange = speaker.prange + intensity * emo["prange"] + j * rng.normal(0, 8)
    volume = speaker.volume + intensity * emo["volume"] + j * rng.normal(0, 12)
    pitch, prange = float(np.clip(pitch, 0, 99)), float(np.clip(prange, 0, 99))
    volume = float(np.clip(volume, 10, 200))

    from avssl.data.synthetic.espeak import Espeak

    tts = Espeak.instance()
    n_frames = int(round(cfg.clip_seconds * FPS))
    n_samples = n_frames * HOP
    rate = float(np.clip(rate, 90, 400))
    for _ in range(4):  # speed up an utterance that does not fit, rather than crop its word
        utt = tts.synth(text, speaker.voice, rate, pitch, prange, volume)
        speech = resample_int16(utt.wave, utt.sample_rate)
        if len(speech) <= n_samples * 0.95 or rate >= 400:
            break
        rate = min(400.0, rate * len(speech) / (n_samples * 0.9))
    tilt = intensity * EMOTION_TILT[emotion] + j * rng.normal(0, 0.1)
    speech = spectral_tilt(speech, float(np.clip(tilt, -1.0, 1.0)))
    slack = n_samples - len(speech)
    offset = slack // 2 + (int(rng.integers(-abs(slack) // 4, abs(slack) // 4 + 1)) if slack > 4 else 0)
    audio = np.zeros(n_samples, np.float32)
    src0, dst0 = max(0, -offset), max(0, offset)
    m = min(len(speech) - src0, n_samples - dst0)
    audio[dst0 : dst0 + m] = speech[src0 : src0 + m]

    # Per-frame emotion drift: the face shows it, the audio gain and the affect labels follow it.
    drift = 0.6 + 0.4 * _smooth_curve(n_frames, rng)
    base_a, base_v = AFFECT[emotion]
    arousal = np.clip(base_a * intensity * drift + rng.normal(0, 0.03, n_frames), -1, 1).astype(np.float32)
    valence = np.clip(base_v * intensity * drift + rng.normal(0, 0.03, n_frames), -1, 1).astype(np.float32)
    gain_db = np.repeat(4.0 * (arousal - arousal.mean()), HOP)
    audio *= 10 ** (gain_db / 20)

    if cfg.loudness_norm:
        rms = float(np.sqrt((audio**2).mean())) + 1e-8
        level = -26.0 + rng.uniform(-cfg.loudness_range_db / 2, cfg.loudness_range_db / 2)
        audio *= 10 ** (level / 20) / rms
    if cfg.snr_db is not None:
        noise = pink_noise(n_samples, rng) if cfg.noise == "pink" else rng.standard_normal(n_samples).astype(np.float32)
        audio = add_noise_at_snr(audio, noise, cfg.snr_db)
    audio = np.clip(audio, -1.0, 1.0)

    frames = None
    if render:
        scale = SAMPLE_RATE / utt.sample_rate
        starts = np.array([s * scale + offset for s, _ in utt.phonemes]) if utt.phonemes else np.zeros(0)
        centres = (np.arange(n_frames) + 0.5) * HOP
        vis = np.tile(np.array([0.0, 1.0, 0.0]), (n_frames, 1))
        for i, c in enumerate(centres):
            k = int(np.searchsorted(starts, c, side="right")) - 1
            if k >= 0:
                vis[i] = viseme(utt.phonemes[k][1])
        vis[:, 0] = np.convolve(np.pad(vis[:, 0], 1, mode="edge"), [0.25, 0.5, 0.25], "valid")  # coarticulation
        env = np.sqrt((audio.reshape(n_frames, HOP) ** 2).mean(1))
        env = env / (env.max() + 1e-8)
        openness = vis[:, 0] * (0.4 + 0.6 * env) * (env > 0.05)
        hm = cfg.head_motion
        dx = hm * (np.cumsum(rng.normal(0, 0.002, n_frames)) + rng.normal(0, 0.01))
        dy = hm * (np.cumsum(rng.normal(0, 0.002, n_frames)) + rng.normal(0, 0.01))
        blink = np.zeros(n_frames)
        for b in rng.integers(0, n_frames, rng.poisson(0.6)):
            seg = blink[max(0, b - 1) : b + 2]
            seg[:] = np.maximum(seg, [0.5, 1.0, 0.5][: len(seg)])
        frames = np.stack(
            [
                draw_face(
                    speaker.face,
                    blend_expression(emotion, intensity * drift[i]),
                    openness[i],
                    vis[i, 1],
                    vis[i, 2],
                    blink[i],
                    dx[i],
                    dy[i],
                    cfg.frame_size,
                )
                for i in range(n_frames)
            ]
        )
    if not cfg.labelled:  # an unlabelled pool: the clip keeps its speaker and nothing else
        return Clip(clip_id=f"{speaker.name}_{clip_index:04d}", split=speaker.split, speaker=speaker.name, audio=audio, frames=frames)
    return Clip(
        clip_id=f"{speaker.name}_{clip_index:04d}",
        split=speaker.split,
        speaker=speaker.name,
        audio=audio,
        frames=frames,
        labels={
            "emotion": emotion,
            "word": word,
            "text": text,
            "arousal": float(arousal.mean()),
            "valence": float(valence.mean()),
            "intensity": round(intensity, 4),
            "snr_db": cfg.snr_db,
        },
        frame_labels={"arousal": arousal, "valence": valence},
    )


def export_media(clip: Clip, root: Path) -> None:
    """Write the clip as a wav and an mp4 (H.264 + AAC) next to the shards."""
    import soundfile as sf

    media = root / "media"
    media.mkdir(exist_ok=True)
    sf.write(media / f"{clip.clip_id}.wav", clip.audio, SAMPLE_RATE, subtype="PCM_16")
    clip.audio_path = f"media/{clip.clip_id}.wav"
    if clip.frames is not None:
        from avssl.data.media import write_mp4

        write_mp4(media / f"{clip.clip_id}.mp4", clip.frames, clip.audio)
        clip.video_path = f"media/{clip.clip_id}.mp4"


def single_threaded() -> None:
    """Worker processes already fill the cores; BLAS threads on top of them only thrash."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def _generate_shard(args: tuple[SynthConfig, int, list[tuple[int, int]], str, str]) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    cfg, seed, jobs, partial_dir, rel = args
    speakers = {s.index: s for s in make_speakers(cfg, seed)}
    clips = [make_clip(cfg, speakers[s], c, seed, render=cfg.video) for s, c in jobs]
    root = Path(partial_dir)
    if cfg.export_media:
        for clip in clips:
            export_media(clip, root)
    info = write_shard(root / rel, clips)
    return rel, info, [clip_row(c, rel, i) for i, c in enumerate(clips)]


def generate(cfg: SynthConfig, seed: int, overwrite: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Write the corpus to `cfg.out`; returns timing and size figures."""
    speakers = make_speakers(cfg, seed)
    # Speakers grouped by split, so shards hold one split each and workers stream only what they train on.
    by_split = sorted(speakers, key=lambda s: (("train", "val", "test").index(s.split), s.index))
    jobs = [(s.index, c) for s in by_split for c in range(cfg.clips_per_speaker)]
    writer = CorpusWriter(cfg.out, name=cfg.name, shard_size=cfg.shard_size, overwrite=overwrite)
    chunks = [jobs[i : i + cfg.shard_size] for i in range(0, len(jobs), cfg.shard_size)]
    tasks = [(cfg, seed, chunk, str(writer.partial), writer.next_shard_name()) for chunk in chunks]
    workers = cfg.workers or os.cpu_count() or 1
    progress = Progress("synth", len(jobs), "clips") if not quiet else None
    t0 = time.perf_counter()
    if workers == 1:
        results = map(_generate_shard, tasks)
        for rel, info, rows in results:
            writer.add_written_shard(rel, info, rows)
            if progress:
                progress.update(len(rows))
    else:
        ctx = get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=ctx, initializer=single_threaded) as pool:
            for rel, info, rows in pool.map(_generate_shard, tasks):
                writer.add_written_shard(rel, info, rows)
                if progress:
                    progress.update(len(rows))
    seconds = time.perf_counter() - t0
    if progress:
        progress.close()
    meta = {
        "generator": {"seed": seed, **cfg.model_dump(mode="json")},
        "labels": {"emotion": list(EMOTIONS), "word": VOCABULARIES[cfg.vocabulary]} if cfg.labelled else {},
        "speakers": {s.name: {"split": s.split, "voice": s.voice} for s in speakers},
    }
    out = writer.finish(meta)
    return {
        "out": str(out),
        "clips": len(jobs),
        "seconds": seconds,
        "clips_per_s": len(jobs) / seconds,
        "clips_per_s_per_worker": len(jobs) / seconds / max(1, min(workers, len(tasks))),
        "workers": min(workers, len(tasks)),
    }


def protocol_corpora(cfg: SynthConfig) -> list[tuple[str, SynthConfig]]:
    """The protocol's corpora as single-corpus configs: `out/<name>`, consecutive speaker ranges (so no
    speaker of the pool appears in a downstream corpus, nor one downstream corpus's in another)."""
    from avssl.errors import ConfigError

    out, offset = [], 0
    for name, spec in cfg.corpora.items():
        if not spec.enabled:
            continue
        fields = spec.model_dump(exclude={"enabled"})
        one = cfg.model_copy(update={**fields, "out": str(Path(cfg.out) / name), "name": f"synth-{name}", "speaker_offset": offset, "protocol": False})
        out.append((name, one))
        offset += spec.speakers
    if offset > MAX_SPEAKERS:
        raise ConfigError(f"synth.corpora: {offset} speakers in all, but the generator has {MAX_SPEAKERS} distinct voices; use fewer speakers")
    return out


def contact_sheet(corpus_root: Path, out: Optional[Path] = None, per_row: int = 12) -> Path:
    """One row per emotion: every third frame of one clip, for a quick look at the corpus."""
    from PIL import Image

    from avssl.data.corpus import Corpus

    corpus = Corpus(corpus_root)
    rows = []
    for emo in EMOTIONS:
        row = next((r for r in corpus.rows if r.get("emotion") == emo), None)
        if row is None:
            continue
        clip = corpus.load(row)
        if clip.frames is None:
            continue
        frames = list(clip.frames[::3][:per_row])
        frames += [np.zeros_like(frames[0])] * (per_row - len(frames))
        rows.append(np.concatenate(frames, 1))
    out = out or corpus_root / "contact_sheet.png"
    if rows:
        Image.fromarray(np.concatenate(rows, 0)).save(out)
    return out
