"""Reading and writing media: wav/flac with soundfile, mp4 with PyAV. Every failure is a
`BadClipError` with a reason key, so `prepare` can skip and count it."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Optional

import numpy as np

from avssl.data.constants import FPS, SAMPLE_RATE
from avssl.errors import BadClipError

MIN_SECONDS = 0.1


def to_mono_16k(audio: np.ndarray, sr: int, path: Path, allowed_rates: Optional[tuple[int, ...]] = None) -> np.ndarray:
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if allowed_rates and sr not in allowed_rates:
        raise BadClipError("unexpected_sample_rate", f"{path}: sample rate {sr} Hz, expected {allowed_rates}")
    if sr < 8000:
        raise BadClipError("unexpected_sample_rate", f"{path}: sample rate {sr} Hz is too low for speech")
    if len(audio) < MIN_SECONDS * sr:
        raise BadClipError("too_short", f"{path}: {len(audio) / sr:.3f} s of audio")
    if not np.isfinite(audio).all():
        raise BadClipError("unreadable_audio", f"{path}: audio has NaN or infinite samples")
    if sr != SAMPLE_RATE:
        import torch

        from avssl.data.features import resample

        audio = resample(torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)), sr).numpy()
    return audio.astype(np.float32)


def wav_data_shortfall(path: Path) -> Optional[tuple[int, int]]:
    """(declared, present) bytes of a RIFF/WAVE data chunk when the file is shorter than its header
    says; None when it is whole or not a WAV. libsndfile quietly reads what is there."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        pos = 12
        while True:
            f.seek(pos)
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            cid, csize = chunk[:4], int.from_bytes(chunk[4:], "little")
            if cid == b"data":
                present = size - pos - 8
                return (csize, present) if csize != 0xFFFFFFFF and present < csize else None
            pos += 8 + csize + (csize & 1)


def read_audio(path: Path, allowed_rates: Optional[tuple[int, ...]] = None) -> np.ndarray:
    """A wav/flac file as 16 kHz mono float32."""
    import soundfile as sf

    try:
        audio, sr = sf.read(str(path), dtype="float32", always_2d=False)
        short = wav_data_shortfall(path)
    except (RuntimeError, sf.LibsndfileError, OSError) as e:
        raise BadClipError("unreadable_audio", f"{path}: cannot read audio ({e})") from None
    if short:
        raise BadClipError("truncated", f"{path}: header says {short[0]} bytes of audio, file holds {short[1]}")
    return to_mono_16k(np.asarray(audio), int(sr), path, allowed_rates)


def _crop_resize(gray: np.ndarray, size: tuple[int, int], crop: tuple[float, float, float, float]) -> np.ndarray:
    """Crop a box given as fractions (left, top, right, bottom) and resize to (H, W)."""
    from PIL import Image

    h, w = gray.shape
    l, t, r, b = int(crop[0] * w), int(crop[1] * h), int(crop[2] * w), int(crop[3] * h)
    im = Image.fromarray(gray[t:b, l:r]).resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def read_video(
    path: Path,
    size: tuple[int, int],
    crop: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0),
) -> tuple[np.ndarray, np.ndarray]:
    """An mp4 with an audio track -> (grayscale frames uint8 [T, H, W] at 25 fps, 16 kHz mono audio)."""
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as e:
        raise BadClipError("unreadable_video", f"{path}: cannot open video ({e})") from None
    try:
        if not container.streams.video:
            raise BadClipError("no_video_stream", f"{path}: no video stream")
        if not container.streams.audio:
            raise BadClipError("no_audio_stream", f"{path}: no audio track")
        vstream = container.streams.video[0]
        rate = vstream.average_rate or vstream.guessed_rate
        if rate is not None and abs(float(rate) - FPS) > 0.5:
            raise BadClipError("unexpected_frame_rate", f"{path}: {float(rate):.2f} fps, expected {FPS}")
        frames, chunks, audio_sr = [], [], None
        for packet in container.demux(vstream, container.streams.audio[0]):
            for frame in packet.decode():
                if isinstance(frame, av.VideoFrame):
                    # reformat, then to_ndarray: the same pixels as to_ndarray(format="gray"), faster in
                    # PyAV 18: 0.4-0.56 -> 0.08-0.1 ms per 96x96 frame on an idle CPU, 5.5 -> 0.1 ms
                    # on one whose cores are busy (as every core is during a prepare).
                    frames.append(_crop_resize(frame.reformat(format="gray").to_ndarray(), size, crop))
                elif isinstance(frame, av.AudioFrame):
                    a = frame.to_ndarray()
                    if a.dtype.kind == "i":
                        a = a.astype(np.float32) / float(np.iinfo(a.dtype).max)
                    if frame.format.is_planar:
                        a = a.mean(axis=0)
                    else:
                        a = a.reshape(-1, len(frame.layout.channels)).mean(axis=1)
                    chunks.append(a.astype(np.float32))
                    audio_sr = frame.sample_rate
    except BadClipError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as e:
        raise BadClipError("truncated", f"{path}: video decoding failed ({e})") from None
    finally:
        container.close()
    if not frames:
        raise BadClipError("truncated", f"{path}: no decodable video frames")
    if not chunks or audio_sr is None:
        raise BadClipError("truncated", f"{path}: no decodable audio")
    audio = to_mono_16k(np.concatenate(chunks), int(audio_sr), path)
    return np.stack(frames), audio


def write_mp4(path: Path, frames: np.ndarray, audio: Optional[np.ndarray], sample_rate: int = SAMPLE_RATE) -> None:
    """Grayscale frames (+ mono audio) as H.264/AAC mp4 at 25 fps; used by tests and media export."""
    import av

    h, w = frames.shape[1:3]
    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=FPS)
        v.width, v.height, v.pix_fmt = w + (w % 2), h + (h % 2), "yuv420p"
        v.options = {"crf": "20", "preset": "veryfast"}
        a = None
        if audio is not None:
            a = out.add_stream("aac", rate=sample_rate)
            a.layout = "mono"
        for img in frames:
            if img.shape != (v.height, v.width):
                img = np.pad(img, ((0, v.height - h), (0, v.width - w)), mode="edge")
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="gray")
            for p in v.encode(vf):
                out.mux(p)
        for p in v.encode():
            out.mux(p)
        if a is not None:
            pcm = np.clip(audio, -1, 1).astype(np.float32)[None, :]
            chunk = 1024
            for i in range(0, pcm.shape[1], chunk):
                af = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[:, i : i + chunk]), format="fltp", layout="mono")
                af.sample_rate = sample_rate
                af.pts = i
                af.time_base = Fraction(1, sample_rate)
                for p in a.encode(af):
                    out.mux(p)
            for p in a.encode():
                out.mux(p)
