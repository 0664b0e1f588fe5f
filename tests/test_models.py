import pytest
import torch

from avssl.config import load_config
from avssl.models import AVSSLModel, build_audio_encoder, load_encoder, save_encoder
from avssl.models.face import ConvIdentityEncoder, UNetFrameDecoder
from tests.conftest import TINY_TRAIN


def test_audio_encoder_one_embedding_per_video_frame():
    cfg = load_config("tiny").model.audio_encoder
    enc = build_audio_encoder(cfg)
    out = enc(torch.randn(3, 40 * 640))
    assert out.shape == (3, 40, cfg.gru_hidden)


def test_paper_preset_encoder_matches_reference_sizes():
    cfg = load_config("paper").model.audio_encoder
    enc = build_audio_encoder(cfg)
    first = enc.first[0]
    assert first.kernel_size == (80,) and first.stride == (16,)  # 5 ms kernel, 1 ms stride at 16 kHz
    channels = [m.out_channels for m in enc.convs.modules() if isinstance(m, torch.nn.Conv1d)]
    assert channels == [32, 64, 128, 256]
    assert enc.code[0].out_channels == 256 and enc.gru.num_layers == 2 and enc.gru.hidden_size == 256


@pytest.mark.parametrize("preset,layers,n_shared", [("tiny", None, 3), ("paper", None, 3), ("tiny", 2, 2), ("tiny", 3, 3), ("tiny", 5, 3)])
def test_shared_layers_equal_per_window_computation(preset, layers, n_shared):
    """Shared leading layers, the stride-1 layer after them and the code as a matrix product compute
    what every window through every conv module computes."""
    cfg = load_config(preset).model.audio_encoder
    if layers:
        cfg = cfg.model_copy(update={"layers": layers})
    enc = build_audio_encoder(cfg)
    for m in enc.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    enc.eval()
    assert enc.n_shared == n_shared  # 40 first-layer positions per hop = 2^3 x 5
    wave = torch.randn(2, 12 * 640) * 0.1
    with torch.no_grad():
        shared = enc.frame_codes(wave)
        reference = enc.frame_codes_by_definition(wave)
        enc.shared_first = False
        per_window = enc.frame_codes(wave)
    assert torch.allclose(shared, reference, atol=1e-5)
    assert torch.allclose(per_window, reference, atol=1e-5)


def test_identity_encoder_and_decoder_shapes_and_residual_start():
    cfg = load_config("tiny")
    ident = ConvIdentityEncoder(cfg.model.identity_encoder, (64, 64))
    dec = UNetFrameDecoder(cfg.model.frame_decoder, ident, audio_dim=16)
    still = torch.rand(2, 1, 64, 64) * 1.6 - 0.8
    code, skips = ident(still)
    assert code.shape == (2, cfg.model.identity_encoder.code_dim)
    assert [s.shape[-1] for s in skips] == [32, 16, 8, 4]
    clip_of = torch.tensor([0, 0, 1])
    frames = dec(torch.randn(3, 16), code, skips, clip_of, still)
    assert frames.shape == (3, 1, 64, 64)
    assert torch.allclose(frames, still[clip_of], atol=2e-3)  # the residual decoder starts as a copy


def test_encoder_file_loads_with_weights_only(tmp_path):
    cfg = load_config("tiny", TINY_TRAIN)
    model = AVSSLModel(cfg.model, cfg.objective, (32, 32), visual=True, audio=True)
    path = save_encoder(model.audio_encoder, cfg.model.audio_encoder, tmp_path / "enc.pt", {"step": 3})
    raw = torch.load(path, weights_only=True)
    assert raw["extra"]["step"] == 3
    enc, extra = load_encoder(path)
    wave = torch.randn(1, 10 * 640)
    model.audio_encoder.eval()
    enc.eval()
    assert torch.allclose(enc(wave), model.audio_encoder(wave))


@pytest.mark.parametrize("warmup, total", [(20, 300), (1, 50), (2, 50), (0, 50), (5, 6)])
def test_warmup_cosine_schedule_is_linear_then_cosine_to_five_percent(warmup, total):
    import math

    from avssl.train.loop import warmup_cosine

    def expected(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    schedule = warmup_cosine(opt, warmup, total)
    for step in range(total):
        assert opt.param_groups[0]["lr"] / 2e-3 == pytest.approx(expected(step), abs=1e-9), step
        opt.step()
        schedule.step()


def _packed_gru(rnn, x, lengths):
    if lengths is None:
        return rnn(x)[0]
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=rnn.batch_first, enforce_sorted=False)
    out, _ = rnn(packed)
    return torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=rnn.batch_first, total_length=x.shape[1 if rnn.batch_first else 0])[0]


@pytest.mark.parametrize("layers,bidirectional,batch_first,ragged", [
    (1, True, True, True),  # the downstream head: clips of several lengths
    (2, False, True, False),  # the audio encoder
    (2, True, True, True),
    (3, True, False, True),
    (1, True, True, False),
])
def test_gru_training_pass_is_nn_gru_on_packed_clips(layers, bidirectional, batch_first, ragged):
    """`gru`'s CPU training pass: the outputs and every gradient (weights, biases, inputs) of
    nn.GRU on the packed sequence, padded back with zeros."""
    from avssl.models.rnn import gru

    torch.manual_seed(0)
    rnn = torch.nn.GRU(10, 12, layers, batch_first=batch_first, bidirectional=bidirectional)
    b, t = 6, 9
    x = torch.randn((b, t, 10) if batch_first else (t, b, 10), requires_grad=True)
    lengths = torch.tensor([9, 3, 7, 1, 9, 5]) if ragged else None
    weight = torch.randn(_packed_gru(rnn, x, lengths).shape)
    grads = []
    for fn in (_packed_gru, gru):
        rnn.zero_grad()
        x.grad = None
        out = fn(rnn, x, lengths)
        (out * weight).sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in rnn.parameters()] + [x.grad.clone()]))
    (ref, ref_grads), (got, got_grads) = grads
    assert torch.allclose(got, ref, atol=1e-6)
    for a, g in zip(ref_grads, got_grads):
        assert torch.allclose(g, a, atol=1e-5)
    if ragged:  # past a clip's length: zero output, no gradient to its input
        mask = torch.arange(t)[None, :] >= lengths[:, None]
        out_bt = got if batch_first else got.transpose(0, 1)
        grad_bt = got_grads[-1] if batch_first else got_grads[-1].transpose(0, 1)
        assert out_bt[mask].abs().max() == 0 and grad_bt[mask].abs().max() == 0
