"""The audio encoder of the speech-driven facial animation generator.

Raw 16 kHz waveform -> one 0.2 s window per 25 fps video frame -> strided Conv1d stack (first layer
kernel 5 ms / stride 1 ms, then kernel 4 / stride 2 layers doubling the channels, BatchNorm + ReLU,
a last conv spanning the remaining length with Tanh) -> a per-frame code -> 2-layer GRU.
"""

from __future__ import annotations

import torch
from torch import nn

from avssl.config.schema import AudioEncoderConfig
from avssl.data.constants import HOP, SAMPLE_RATE
from avssl.models.registry import AUDIO_ENCODERS
from avssl.models.rnn import gru


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(cin, cout, kernel, stride, bias=False), nn.BatchNorm1d(cout), nn.ReLU(inplace=True))


@AUDIO_ENCODERS.register("conv_gru")
class ConvGRUAudioEncoder(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.window = int(round(cfg.window_seconds * SAMPLE_RATE))
        k1 = int(round(cfg.first_kernel_ms * SAMPLE_RATE / 1000))
        self.stride1 = int(round(cfg.first_stride_ms * SAMPLE_RATE / 1000))
        if self.window < HOP or k1 > self.window:
            raise ValueError("audio window must cover at least one frame hop and the first kernel")
        # Windows overlap five times over. Leading layers run once over the whole waveform and their
        # output is cut into windows, as long as each window still starts on a whole output
        # position, and the next layer runs at stride 1 over the whole waveform too (the same
        # function as running them per window; in training, BatchNorm then takes its statistics
        # over the sequence rather than over overlapping windows).
        self.shared_first = HOP % self.stride1 == 0
        c = cfg.base_channels
        self.first = _conv_bn_relu(1, c, k1, self.stride1)
        length = (self.window - k1) // self.stride1 + 1
        self.first_length = length
        layers, lengths = [], [length]
        for i in range(cfg.layers):
            if (length - 4) // 2 + 1 < 1:
                raise ValueError(f"audio_encoder.layers={cfg.layers} downsamples the {cfg.window_seconds} s window below one sample")
            layers.append(_conv_bn_relu(c * 2**i, c * 2 ** (i + 1), 4, 2))
            length = (length - 4) // 2 + 1
            lengths.append(length)
        self.convs = nn.Sequential(*layers)
        self.lengths = lengths
        self.hop_after, self.n_shared = [HOP // self.stride1] if self.shared_first else [0], 0
        if self.shared_first:
            hop = HOP // self.stride1
            while self.n_shared < len(layers) and hop % 2 == 0:
                hop //= 2
                self.n_shared += 1
                self.hop_after.append(hop)
        self.code = nn.Sequential(nn.Conv1d(c * 2 ** cfg.layers, cfg.code_dim, length), nn.Tanh())
        self.gru = nn.GRU(cfg.code_dim, cfg.gru_hidden, cfg.gru_layers, batch_first=True)
        self.code_dim = cfg.code_dim
        self.out_dim = cfg.gru_hidden

    def _padded(self, wave: torch.Tensor) -> tuple[int, int, torch.Tensor]:
        """(B, T, the waveform padded so that window t, centred on frame t, starts at t * HOP)."""
        b, t = wave.shape[0], wave.shape[1] // HOP
        left = (self.window - HOP) // 2
        return b, t, nn.functional.pad(wave[:, : t * HOP], (left, self.window - HOP - left))

    def _windows(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """[B, S'] padded waveform -> [B*T, 1, window], one row per frame."""
        return x.unfold(-1, self.window, HOP)[:, :t].reshape(-1, 1, self.window)

    def frame_codes(self, wave: torch.Tensor) -> torch.Tensor:
        """[B, S] -> [B, T, code_dim], T = S // HOP; window t is centred on frame t."""
        b, t, x = self._padded(wave)
        if self.shared_first:
            h = self.first(x.unsqueeze(1))  # [B, C, P], over the whole clip
            for layer in self.convs[: self.n_shared]:
                h = layer(h)
            k = self.n_shared
            if k == len(self.convs):
                # Every layer is shared: the code conv over window t is a convolution with stride hop.
                return self._code_over_clip(h, self.hop_after[k], 1, t)
            # The first layer whose windows start on odd positions: run it at stride 1 over the
            # whole clip; window t then reads its outputs at hop*t + 2j (the same values as running
            # it per window, with fewer multiply-adds: the windows overlap).
            c, norm, relu = self.convs[k]
            h = relu(norm(nn.functional.conv1d(h, c.weight, c.bias)))  # [B, C, P - 3]
            if k + 1 == len(self.convs):
                # ... and the code conv over those positions is a convolution with stride hop and dilation 2.
                return self._code_over_clip(h, self.hop_after[k], 2, t)
            n = self.lengths[k + 1]
            h = h.unfold(-1, 2 * n - 1, self.hop_after[k])[:, :, :t, ::2]  # [B, C, T, L_k+1]: positions hop*t + 2j
            h = h.permute(0, 2, 1, 3).reshape(b * t, h.shape[1], n)
            h = self.convs[k + 1 :](h)
        else:
            h = self.convs(self.first(self._windows(x, t)))
        # The code conv spans the whole remaining length: one matrix product (the same weights; a
        # CPU convolution's backward pass is several times slower on this shape).
        conv, act = self.code
        code = act(nn.functional.linear(h.flatten(1), conv.weight.flatten(1), conv.bias))  # [B*T, code_dim]
        return code.reshape(b, t, self.code_dim)

    def _code_over_clip(self, h: torch.Tensor, hop: int, dilation: int, t: int) -> torch.Tensor:
        """The code conv of every window at once from the whole clip's map h [B, C, P]: window t
        reads positions hop*t + dilation*j. -> [B, T, code_dim]"""
        conv, act = self.code
        return act(nn.functional.conv1d(h, conv.weight, conv.bias, stride=hop, dilation=dilation)[..., :t]).transpose(1, 2)

    def frame_codes_by_definition(self, wave: torch.Tensor) -> torch.Tensor:
        """What `frame_codes` computes, as the architecture defines it: each window through every
        conv module on its own (several times slower; tests and benchmarks compare with it)."""
        b, t, x = self._padded(wave)
        return self.code(self.convs(self.first(self._windows(x, t)))).reshape(b, t, self.code_dim)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """[B, S] -> [B, T, out_dim] per-frame embeddings."""
        return gru(self.gru, self.frame_codes(wave))

    @property
    def layer_names(self) -> list[str]:
        return ["code"] + [f"gru{i + 1}" for i in range(self.gru.num_layers)]

    @property
    def layer_dims(self) -> list[int]:
        return [self.code_dim] + [self.gru.hidden_size] * self.gru.num_layers

    def layer_outputs(self, wave: torch.Tensor) -> list[torch.Tensor]:
        """[B, S] -> every representation a head may read: the conv code, then each GRU layer's
        output ([B, T, D] each). The GRU layers run one at a time with the stacked GRU's own weights."""
        from torch.func import functional_call

        x = self.frame_codes(wave)
        outs = [x]
        for layer in range(self.gru.num_layers):
            single = nn.GRU(x.shape[-1], self.gru.hidden_size, 1, batch_first=True, bias=self.gru.bias)
            params = {f"{kind}_l0": getattr(self.gru, f"{kind}_l{layer}") for kind in ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if self.gru.bias else ())}
            x, _ = functional_call(single, params, (x,))
            outs.append(x)
        return outs
