"""Knowledge distillation: losses, distill(), teacher cache, kd_loss_fn, students, bad input."""

from __future__ import annotations

import pytest
import torch
from tiny import TinyCNN, TinyMLP
from torch import nn

from edgeslim.core.errors import ConfigError, DataError, ModelError
from edgeslim.distill import LOSSES, DistillConfig, LossContext, cnn_student, distill, kd_loss_fn, layer_drop_student
from edgeslim.train import TrainConfig, evaluate, fit

TC = TrainConfig(epochs=2, lr=0.1, batch_size=32, augment=False, warmup_steps=5)


@pytest.fixture(scope="module")
def digits():
    from edgeslim.data import load

    train, val = load("digits")
    return train.take(400), val.take(200)


@pytest.fixture(scope="module")
def teacher(digits):
    train, val = digits
    torch.manual_seed(0)
    return fit(
        TinyMLP(),
        train,
        val,
        TrainConfig(epochs=6, lr=0.1, batch_size=32, augment=False, warmup_steps=5),
        progress=False,
    ).model


def _state(m: nn.Module) -> dict:
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_losses_are_zero_for_identical_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 10, generator=g)
    fmap = torch.randn(6, 4, 5, 5, generator=g)
    same = LossContext(
        logits,
        logits.clone(),
        torch.zeros(6, dtype=torch.long),
        4.0,
        [fmap],
        [fmap.clone()],
        nn.ModuleList([nn.Identity()]),
    )
    other = LossContext(
        logits,
        torch.randn(6, 10, generator=g),
        torch.zeros(6, dtype=torch.long),
        4.0,
        [fmap],
        [torch.randn(6, 4, 5, 5, generator=g)],
        nn.ModuleList([nn.Identity()]),
    )
    for name in ("kd", "hint", "attention", "rkd", "similarity"):
        assert float(LOSSES.get(name)(same)) == pytest.approx(0.0, abs=1e-5), name
        assert float(LOSSES.get(name)(other)) > 1e-4, name


def test_kd_distill_makes_student_agree_with_teacher_and_leaves_inputs_alone(digits, teacher):
    train, val = digits
    torch.manual_seed(1)
    student = TinyMLP()
    before_s, before_t = _state(student), _state(teacher)
    out = distill(
        student,
        teacher,
        DistillConfig(hard_weight=0.0, temperature=2.0),
        data=(train, val),
        train_config=TC.replace(epochs=4),
        progress=False,
    )
    x = val.normalized()
    with torch.no_grad():
        agree = float((out(x).argmax(1) == teacher(x).argmax(1)).float().mean())
        agree_init = float((student(x).argmax(1) == teacher(x).argmax(1)).float().mean())
    assert agree > 0.7 and agree > agree_init + 0.4
    assert evaluate(out, val) > 0.6  # learned the task from soft labels only (hard_weight=0)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before_s.items())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before_t.items())
    assert len(out.distill_history) == 4


def test_teacher_cache_is_written_keyed_and_gives_same_result_as_live_teacher(digits, teacher, tmp_path):
    train, val = digits
    cfg = DistillConfig(losses=("kd", "similarity"), weights=(1.0, 0.5))
    torch.manual_seed(2)
    student = TinyMLP()
    cached = distill(
        student, teacher, cfg, data=(train, val), train_config=TC, progress=False, checkpoint_dir=tmp_path / "a"
    )
    live = distill(
        student, teacher, cfg.replace(cache_teacher=False), data=(train, val), train_config=TC, progress=False
    )
    files = list((tmp_path / "a").glob("teacher-*.pt"))
    assert len(files) == 1
    assert torch.load(files[0], weights_only=True)["logits"].shape == (len(train), 10)
    for k, v in cached.state_dict().items():
        torch.testing.assert_close(v, live.state_dict()[k], atol=1e-4, rtol=1e-4)


def test_hint_with_adapters_between_named_layers(digits, teacher):
    train, val = digits
    cfg = DistillConfig(losses=("kd", "hint"), student_layers=("net.2",), teacher_layers=("net.1",))
    torch.manual_seed(3)
    out = distill(TinyMLP(), teacher, cfg, data=(train, val), train_config=TC, progress=False)
    assert evaluate(out, val) > 0.5
    assert "adapters.0.weight" not in out.state_dict()  # the student comes back without the adapters


def test_feature_losses_on_cnn_with_different_spatial_sizes(digits):
    train, val = digits
    torch.manual_seed(4)
    teacher = TinyCNN()
    cfg = DistillConfig(
        losses=("kd", "hint", "attention", "rkd"), student_layers=("stem", "pw"), teacher_layers=("stem", "dw")
    )
    out = distill(
        TinyCNN(), teacher, cfg, data=(train.take(64), None), train_config=TC.replace(epochs=1), progress=False
    )
    assert isinstance(out, TinyCNN)


def test_kd_loss_fn_plugs_into_fit_and_rejects_feature_losses(digits, teacher):
    train, val = digits
    fn = kd_loss_fn(teacher, DistillConfig(temperature=3.0))
    x = val.normalized()[:8]
    with torch.no_grad():
        assert float(fn(teacher(x), val.labels[:8], x)) == pytest.approx(0.0, abs=1e-5)
    torch.manual_seed(5)
    res = fit(TinyMLP(), train, val, TC, loss_fn=fn, progress=False)
    assert res.best_accuracy > 0.5
    with pytest.raises(ConfigError, match="logit losses only"):
        kd_loss_fn(teacher, DistillConfig(losses=("hint",), student_layers=("net.1",), teacher_layers=("net.1",)))


def test_bad_input_errors(digits, teacher):
    train, val = digits
    with pytest.raises(ConfigError, match="temperature"):
        DistillConfig(temperature=0)
    with pytest.raises(ConfigError, match="temperature"):
        DistillConfig(temperature=-1.0)
    with pytest.raises(ConfigError, match="did you mean 'kd'"):
        DistillConfig(losses=("kdd",))
    with pytest.raises(ConfigError, match="weights"):
        DistillConfig(losses=("kd", "rkd"), weights=(1.0,))
    with pytest.raises(ConfigError, match="student_layers"):
        DistillConfig(losses=("hint",))
    with pytest.raises(ConfigError, match=r"no module 'net\.22'.*did you mean 'net\.2'"):
        distill(
            TinyMLP(),
            teacher,
            DistillConfig(losses=("hint",), student_layers=("net.22",), teacher_layers=("net.1",)),
            data=(train, val),
            progress=False,
        )
    with pytest.raises(ConfigError, match="teacher has no module 'fc1'"):
        distill(
            TinyMLP(),
            teacher,
            DistillConfig(losses=("hint",), student_layers=("net.1",), teacher_layers=("fc1",)),
            data=(train, val),
            progress=False,
        )
    with pytest.raises(ModelError, match=r"output shape \(2, 5\) does not match teacher output shape \(2, 10\)"):
        distill(TinyMLP(num_classes=5), teacher, data=(train, val), progress=False)
    with pytest.raises(DataError, match="empty"):
        distill(TinyMLP(), teacher, data=(train.take(0), val), progress=False)
    assert DistillConfig.from_yaml(DistillConfig(losses=("kd", "rkd"), weights=(1, 2)).to_yaml()).weights == (1, 2)


def test_cnn_students_are_smaller_and_run():
    from edgeslim.models import load

    def n(m):
        return sum(p.numel() for p in m.parameters())

    small = cnn_student("small_cnn", width=0.5)
    assert n(small) < n(load("small_cnn", pretrained=False)) / 3
    r = cnn_student("resnet18", width=0.25, depth=0.5)
    assert n(r) < n(load("resnet18", pretrained=False)) / 20
    assert r(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ConfigError, match="valid: resnet18, small_cnn"):
        cnn_student("vgg")


def test_layer_drop_student_copies_every_other_layer():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=6,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    teacher = transformers.BertModel(cfg).eval()
    student = layer_drop_student(teacher).eval()
    assert len(student.encoder.layer) == 3 and student.config.num_hidden_layers == 3
    assert len(teacher.encoder.layer) == 6
    for s_i, t_i in zip(range(3), (0, 2, 4)):
        for (k, v), (_, w) in zip(
            student.encoder.layer[s_i].state_dict().items(), teacher.encoder.layer[t_i].state_dict().items()
        ):
            assert torch.equal(v, w), k
    ids = torch.randint(0, 50, (2, 8))
    assert student(input_ids=ids).last_hidden_state.shape == (2, 8, 16)
    with pytest.raises(ConfigError, match="keep"):
        layer_drop_student(teacher, keep=[0, 7])


def test_checkpoint_resume_and_early_stop(digits, teacher, tmp_path):
    train, val = digits
    cfg = DistillConfig()
    torch.manual_seed(6)
    student = TinyMLP()
    first = distill(student, teacher, cfg, data=(train, val), train_config=TC, progress=False, checkpoint_dir=tmp_path)
    again = distill(student, teacher, cfg, data=(train, val), train_config=TC, progress=False, checkpoint_dir=tmp_path)
    assert len(list(tmp_path.glob("run-*/last.pt"))) == 1
    assert again.distill_history == first.distill_history  # resumed after the last epoch: nothing retrained
    # another config in the same folder gets its own run (no cross-resume)
    other = distill(
        student,
        teacher,
        cfg.replace(temperature=2.0),
        data=(train, val),
        train_config=TC,
        progress=False,
        checkpoint_dir=tmp_path,
    )
    assert len(list(tmp_path.glob("run-*/last.pt"))) == 2 and len(other.distill_history) == 2
    # early stop: an lr so small that validation accuracy cannot improve for `patience` epochs
    stopped = distill(
        student,
        teacher,
        cfg,
        data=(train, val),
        progress=False,
        train_config=TC.replace(epochs=20, lr=1e-9, patience=2),
    )
    assert len(stopped.distill_history) < 20


# --- transformer losses (tiny BertModel, no downloads) and the registry sweep -------------------------------------


def _tiny_bert(seed: int, layers: int = 2, vocab: int = 50):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        attn_implementation="eager",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    return transformers.BertModel(cfg).eval()


def _sharpen(bert: nn.Module) -> None:
    """Sharper attention maps: a random init attends almost uniformly, which makes every map look alike."""
    with torch.no_grad():
        for layer in bert.encoder.layer:
            layer.attention.self.query.weight.mul_(4)
            layer.attention.self.key.weight.mul_(4)


def _attn_outputs(model: nn.Module, ids: torch.Tensor, layers: tuple[int, ...]) -> list:
    """(context, attention_probs) of the self-attention of the given layers, via forward hooks."""
    got: dict[int, tuple] = {}
    hooks = [
        model.encoder.layer[i].attention.self.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(i, o))
        for i in layers
    ]
    try:
        model(input_ids=ids, output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
    return [got[i] for i in layers]


def _ctx(s_feats, t_feats, adapters=None) -> LossContext:
    logits = torch.zeros(len(s_feats[0][0]), 2)
    return LossContext(logits, logits, torch.zeros(len(logits), dtype=torch.long), 2.0, s_feats, t_feats, adapters)


def test_attention_map_is_zero_for_identical_maps_and_decreases_when_the_student_learns_to_match():
    teacher, student = _tiny_bert(0), _tiny_bert(1)
    _sharpen(teacher)
    ids = torch.randint(1, 50, (8, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t_feats = _attn_outputs(teacher, ids, (0, 1))
        assert t_feats[0][1].shape == (8, 2, 10, 10)  # eager attention hands back its probabilities
        same = LOSSES.get("attention_map")(_ctx(_attn_outputs(teacher, ids, (0, 1)), t_feats))
    assert float(same) == pytest.approx(0.0, abs=1e-6)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = LOSSES.get("attention_map")(_ctx(_attn_outputs(student, ids, (0, 1)), t_feats))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[0] > 1e-3
    assert losses[-1] < 0.3 * losses[0]
    with pytest.raises(ValueError, match="attn_implementation='eager'"):  # plain tensors: no probabilities
        LOSSES.get("attention_map")(_ctx([torch.randn(2, 4, 16)], [torch.randn(2, 4, 16)]))


def test_hidden_state_uses_linear_adapters_between_transformer_widths():
    from edgeslim.distill._losses import make_adapter

    g = torch.Generator().manual_seed(0)
    t = (torch.randn(4, 6, 16, generator=g), None)  # HF modules return tuples: the hidden state comes first
    s = torch.randn(4, 6, 8, generator=g)
    adapter = make_adapter(s, t)
    assert isinstance(adapter, nn.Linear) and (adapter.in_features, adapter.out_features) == (8, 16)
    fn = LOSSES.get("hidden_state")
    assert float(fn(_ctx([t], [t], nn.ModuleList([nn.Identity()])))) == pytest.approx(0.0, abs=1e-7)
    adapters = nn.ModuleList([adapter])
    opt = torch.optim.Adam(adapters.parameters(), lr=5e-2)
    first = float(fn(_ctx([s], [t], adapters)))
    for _ in range(60):
        loss = fn(_ctx([s], [t], adapters))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 0.5 and float(loss) < 0.7 * first  # the learned adapter explains part of the teacher state


def test_every_registered_loss_is_covered_by_a_zero_for_identical_test():
    tested = {"kd", "hint", "attention", "rkd", "similarity", "hidden_state", "attention_map"}
    assert set(LOSSES.names()) == tested, "a new loss needs a test above"


class _TokenSet:
    """A duck-typed (non-image) dataset: token ids as the inputs."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.labels)

    def normalized(self) -> torch.Tensor:
        return self.ids

    def take(self, n: int, *, seed: int = 0) -> _TokenSet:
        return _TokenSet(self.ids[:n], self.labels[:n])

    def batches(self, batch_size: int = 256):
        return [
            (self.ids[i : i + batch_size], self.labels[i : i + batch_size]) for i in range(0, len(self), batch_size)
        ]


class _TextClassifier(nn.Module):
    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert, self.head = bert, nn.Linear(16, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.bert(input_ids=ids).last_hidden_state.mean(1))


def test_distill_text_student_with_attention_map_and_hidden_state_on_token_ids(tmp_path):
    teacher = _TextClassifier(_tiny_bert(0, layers=4)).eval()
    _sharpen(teacher.bert)
    student = _TextClassifier(layer_drop_student(_tiny_bert(2, layers=4), keep=[1, 3]))  # not the teacher's layers
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (64, 8), generator=g)
    data = _TokenSet(ids, (ids[:, 0] > 25).long())
    pairs = (
        ("bert.encoder.layer.0.attention.self", "bert.encoder.layer.0.attention.self"),
        ("bert.encoder.layer.1.attention.self", "bert.encoder.layer.2.attention.self"),
    )
    cfg = DistillConfig(
        losses=("kd", "attention_map", "hidden_state"),
        weights=(1.0, 100.0, 1.0),
        student_layers=tuple(s for s, _ in pairs),
        teacher_layers=tuple(t for _, t in pairs),
    )

    def attn_loss(m: nn.Module) -> float:
        s = _attn_outputs(m.bert, ids, (0, 1))
        t = _attn_outputs(teacher.bert, ids, (0, 2))
        return float(LOSSES.get("attention_map")(_ctx(s, t)))

    with torch.no_grad():
        before = attn_loss(student)
    out = distill(
        student,
        teacher,
        cfg,
        data=(data, data.take(32)),
        progress=False,
        checkpoint_dir=tmp_path,
        train_config=TrainConfig(epochs=4, batch_size=16, lr=1e-2, optimizer="adamw", augment=False, warmup_steps=2),
    )
    with torch.no_grad():
        after = attn_loss(out)
    assert len(out.bert.encoder.layer) == 2 and len(out.distill_history) == 4
    assert after < 0.8 * before
    cache = torch.load(next(tmp_path.glob("teacher-*.pt")), weights_only=True)  # token ids keyed, tuples cached
    assert cache["feats"][1][1].shape == (64, 2, 8, 8)


class _Trimmed(nn.Module):
    """Dynamic padding: drops the all-pad tail columns of the batch, so feature lengths vary by batch."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.feat, self.head = nn.Embedding(10, 4), nn.Identity(), nn.Linear(4, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids[:, : int((ids != 0).sum(1).max())]
        return self.head(self.feat(self.emb(ids)).mean(1))


def test_teacher_feature_cache_with_batch_dependent_lengths_says_how_to_fix():
    ids = torch.zeros(300, 6, dtype=torch.long)
    ids[:, :3] = 1
    ids[256:, 3:5] = 2  # the second cache batch (rows 256+) is longer
    data = _TokenSet(ids, torch.zeros(300, dtype=torch.long))
    cfg = DistillConfig(losses=("kd", "hidden_state"), student_layers=("feat",), teacher_layers=("feat",))
    with pytest.raises(ModelError, match="changes shape between batches.*cache_teacher=False"):
        distill(_Trimmed(), _Trimmed(), cfg, data=(data, None), train_config=TC, progress=False)
    out = distill(
        _Trimmed(),
        _Trimmed(),
        cfg.replace(cache_teacher=False),
        data=(data, None),
        progress=False,
        train_config=TC.replace(epochs=1),
    )
    assert isinstance(out, _Trimmed)
