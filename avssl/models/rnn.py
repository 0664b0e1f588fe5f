"""`nn.GRU`'s function with a cheaper CPU training pass.

On CPU, autograd through `nn.GRU` records a dozen small operations per time step and direction,
and at the sizes of this project's encoders and heads (30 frames, 32-128 units) a training step
spends most of its time dispatching them. `gru` computes the same function with the same
parameters as one autograd node: the input projections of every step in one matrix product,
both directions (or the layers' directions) stepped together, the backward recursion reduced to
what depends on it, and the weight gradients as one matrix product each. Padded sequences follow
packed-sequence semantics: a clip's state stops at its length, its outputs past it are zero, and
the reverse direction starts at its last valid frame. On a GPU, or without gradients, it is
`nn.GRU` itself.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class _GRUSteps(torch.autograd.Function):
    """D independent single-layer GRUs over one time-major batch: x [D, T, B, I] (each sequence
    already in its own time order, padding after its valid steps), weights stacked over D as
    nn.GRU stores them (gates r, z, n). Returns the outputs [D, T, B, H]. Steps past a sequence's
    length never reach its valid steps, so padding is masked by the caller, on the outputs."""

    @staticmethod
    def forward(ctx, x, w_ih, w_hh, b_ih, b_hh):
        d, t_len, b, i = x.shape
        h_dim = w_hh.shape[2]
        gi = torch.baddbmm(b_ih.unsqueeze(1), x.reshape(d, t_len * b, i), w_ih.transpose(1, 2)).view(d, t_len, b, 3 * h_dim)
        gi_rz, gi_n = gi[..., : 2 * h_dim].unbind(1), gi[..., 2 * h_dim :].unbind(1)
        w_t, bias = w_hh.transpose(1, 2), b_hh.unsqueeze(1)
        h = x.new_zeros(d, b, h_dim)
        hs, rzs, ns, ghns = [h], [], [], []
        for t in range(t_len):
            gh = torch.baddbmm(bias, h, w_t)
            rz = torch.sigmoid(gi_rz[t] + gh[..., : 2 * h_dim])
            ghn = gh[..., 2 * h_dim :]
            n = torch.tanh(torch.addcmul(gi_n[t], rz[..., :h_dim], ghn))
            h = torch.lerp(n, h, rz[..., h_dim:])  # (1 - z) n + z h
            hs.append(h)
            rzs.append(rz)
            ns.append(n)
            ghns.append(ghn)
        states = torch.stack(hs, 1)  # [D, T + 1, B, H]: states[:, t] is the state before step t
        ctx.save_for_backward(x, w_ih, w_hh, states, torch.stack(rzs, 1), torch.stack(ns, 1), torch.stack(ghns, 1))
        return states[:, 1:].clone()

    @staticmethod
    def backward(ctx, dout):
        x, w_ih, w_hh, states, rz, n, ghn = ctx.saved_tensors
        d, t_len, b, h_dim = dout.shape
        r, z = rz[..., :h_dim], rz[..., h_dim:]
        # Everything that does not depend on the backward recursion, for all steps at once.
        dn_pre = (1 - z) * (1 - n * n)  # d(pre-tanh n) / d(state)
        gates = torch.cat([ghn * r * (1 - r), (states[:, :-1] - n) * z * (1 - z), r], -1)  # [D, T, B, 3H]
        douts, dns, gs, zs = dout.unbind(1), dn_pre.unbind(1), gates.unbind(1), z.unbind(1)
        dh = dout.new_zeros(d, b, h_dim)
        dghs, das = [None] * t_len, [None] * t_len
        for t in range(t_len - 1, -1, -1):
            dh = dh + douts[t]
            da = dh * dns[t]
            dgh = torch.cat([da, dh, da], -1) * gs[t]  # [d(r pre-sigmoid), d(z pre-sigmoid), d(gh_n)]
            dh = torch.baddbmm(dh * zs[t], dgh, w_hh)
            dghs[t], das[t] = dgh, da
        dgh_all = torch.stack(dghs, 1).reshape(d, t_len * b, 3 * h_dim)
        dgi_all = torch.cat([dgh_all[..., : 2 * h_dim], torch.stack(das, 1).reshape(d, t_len * b, h_dim)], -1)
        dx = torch.bmm(dgi_all, w_ih).view(x.shape)
        dw_ih = torch.bmm(dgi_all.transpose(1, 2), x.reshape(d, t_len * b, -1))
        dw_hh = torch.bmm(dgh_all.transpose(1, 2), states[:, :-1].reshape(d, t_len * b, h_dim))
        return dx, dw_ih, dw_hh, dgi_all.sum(1), dgh_all.sum(1)


def _reverse_within(x: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
    """x [T, B, F] with each sequence's valid steps reversed in place (index [T, B]); all steps when index is None."""
    if index is None:
        return x.flip(0)
    return x.gather(0, index.unsqueeze(-1).expand(-1, -1, x.shape[2]))


def uses_fast_path(rnn: nn.GRU, x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and torch.is_grad_enabled() and rnn.bias


def gru(rnn: nn.GRU, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The output sequence of `rnn` (all layers, both directions) on x [B, T, I] (batch-first) or
    [T, B, I], as `nn.GRU` with a zero initial state gives it; with `lengths`, as it gives it on
    the packed sequence, padded back to T with zeros."""
    batch_first = rnn.batch_first
    if not uses_fast_path(rnn, x):
        if lengths is None:
            return rnn(x)[0]
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu().clamp_min(1), batch_first=batch_first, enforce_sorted=False)
        out, _ = rnn(packed)
        return nn.utils.rnn.pad_packed_sequence(out, batch_first=batch_first, total_length=x.shape[1 if batch_first else 0])[0]
    h = x.transpose(0, 1) if batch_first else x  # [T, B, I]
    t_len = h.shape[0]
    mask = index = None
    if lengths is not None:
        steps = torch.arange(t_len, device=x.device)[:, None]
        lengths = lengths.to(x.device).clamp_min(1)
        valid = steps < lengths[None, :]
        if not bool(valid.all()):
            mask = valid.to(x.dtype).unsqueeze(-1)
            index = torch.where(valid, lengths[None, :] - 1 - steps, steps)
    dirs = ["", "_reverse"] if rnn.bidirectional else [""]
    for layer in range(rnn.num_layers):
        if layer and rnn.dropout and rnn.training:
            h = nn.functional.dropout(h, rnn.dropout, True)
        seqs = [h] + ([_reverse_within(h, index)] if rnn.bidirectional else [])

        def stacked(kind: str) -> torch.Tensor:
            return torch.stack([getattr(rnn, f"{kind}_l{layer}{s}") for s in dirs])

        out = _GRUSteps.apply(torch.stack(seqs), stacked("weight_ih"), stacked("weight_hh"), stacked("bias_ih"), stacked("bias_hh"))
        parts = [out[0]] + ([_reverse_within(out[1], index)] if rnn.bidirectional else [])
        h = torch.cat(parts, -1) if len(parts) > 1 else parts[0]
        if mask is not None:  # what a packed sequence leaves past each length: zeros
            h = h * mask
    return h.transpose(0, 1) if batch_first else h
