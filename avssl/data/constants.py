"""Timing shared by every part of the pipeline: 16 kHz audio, 25 fps video, one hop per frame."""

SAMPLE_RATE = 16000
FPS = 25
HOP = SAMPLE_RATE // FPS  # 640 audio samples per video frame
