"""Audio front-end: streaming STFT, mel filterbank and MFCC in Numba."""

from engine.dsp.mfcc import PRESETS, MfccPreset, StreamingMfcc, mfcc
from engine.dsp.stft import StftConfig, StreamingStft, stft

__all__ = ["PRESETS", "MfccPreset", "StftConfig", "StreamingMfcc", "StreamingStft", "mfcc", "stft"]
