"""DGCNN and the point-cloud incremental model: the chunked kNN graph against brute force, EdgeConv against
its definition, shapes, permutation equivariance, chunking invariance, norms, MiB init and checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models import DGCNN
from modules import ABN, BatchNormAct2d, InPlaceABN, InPlaceABNSync, is_norm_layer
from modules.edgeconv import EdgeConv, edge_features, gather_neighbours, knn
from segmentation_module import build_norm_act, make_model
from tests.conftest import make_opts
from utils.checkpoint import add_module_prefix, load_checkpoint, load_model_state, save_checkpoint
from utils.errors import CheckpointError, OptionsError


def brute_force_distances(points: torch.Tensor) -> torch.Tensor:
    """(B, C, N) -> (B, N, N) float64 Euclidean distances, by the definition."""
    p = points.double().transpose(1, 2)  # (B, N, C)
    return (p[:, :, None, :] - p[:, None, :, :]).square().sum(-1).sqrt()


def point_opts(**overrides):
    return make_opts(backbone="dgcnn", dataset="scannet", num_classes=21, **overrides)


# --- kNN --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "channels", "num_points", "k", "chunk"),
    [
        (2, 3, 50, 1, None),
        (2, 3, 50, 20, None),
        (2, 9, 50, 20, 1),  # one query row at a time
        (2, 9, 50, 20, 7),  # chunks that do not divide N: a short last chunk
        (2, 9, 50, 50, 49),  # k = N, one row short of a whole cloud
        (3, 9, 50, 20, 50),  # exactly one cloud per chunk
        (3, 9, 50, 20, 51),  # more than one cloud's rows, still one cloud per chunk
        (3, 9, 50, 20, 100),  # two clouds per chunk, a short last chunk of clouds
        (3, 64, 40, 20, 10_000),  # all clouds at once
    ],
)
def test_knn_equals_brute_force(batch, channels, num_points, k, chunk):
    torch.manual_seed(0)
    points = torch.randn(batch, channels, num_points)
    idx = knn(points, k, chunk_size=chunk)
    assert idx.shape == (batch, num_points, k) and idx.dtype == torch.long
    distances = brute_force_distances(points)
    expected_dist, expected_idx = distances.sort(dim=-1)
    # Random points have no ties: the same neighbours in the same order (nearest first, the point itself).
    assert torch.equal(idx, expected_idx[..., :k])
    assert torch.equal(idx[..., 0], torch.arange(num_points).expand(batch, -1))
    torch.testing.assert_close(distances.gather(-1, idx), expected_dist[..., :k])


def test_knn_chunked_equals_unchunked():
    """Every chunking gives every point the same neighbours. (A one-row chunk is a matrix-vector product
    whose rounding differs in the last bit: neighbours at equal-to-rounding distances may then swap places
    in the list, which EdgeConv's maximum does not see.)"""
    torch.manual_seed(1)
    points = torch.rand(4, 9, 120)
    full = knn(points, 20).sort(dim=-1).values
    for chunk in (1, 13, 119, 120, 121, 240, 479, 480, 5000):
        assert torch.equal(knn(points, 20, chunk_size=chunk).sort(dim=-1).values, full), chunk


def test_knn_ties_give_a_valid_neighbourhood():
    """Points on an integer grid, each one duplicated: many exactly equal distances. Any choice among
    tied points is a correct kNN graph: the selected distances are the k smallest, without repeats."""
    grid = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")).flatten(1)
    points = torch.cat([grid, grid], dim=1)[None]  # (1, 2, 32): point i and i + 16 coincide
    k = 7
    for chunk in (None, 5, 32):
        idx = knn(points, k, chunk_size=chunk)[0]  # (32, k)
        distances = brute_force_distances(points)[0]
        torch.testing.assert_close(distances.gather(-1, idx), distances.sort(-1).values[:, :k])
        assert all(len(set(row.tolist())) == k for row in idx)  # k distinct points
        # The two points at distance 0 (the point and its duplicate) come first.
        assert torch.all(distances.gather(-1, idx)[:, :2] == 0)


def test_duplicated_points_get_identical_features():
    """Which of two coinciding points the graph picks does not matter: their features are equal."""
    torch.manual_seed(0)
    base = torch.rand(2, 9, 40)
    points = torch.cat([base, base[:, :, :10]], dim=2)  # points 40..49 duplicate 0..9
    net = DGCNN(9, build_norm_act("iabn_sync"), k=8).eval()
    with torch.no_grad():
        features, _ = net(points)
    torch.testing.assert_close(features[:, :, 40:], features[:, :, :10])


def test_knn_refuses_k_larger_than_the_cloud_and_bad_chunks():
    points = torch.rand(2, 3, 10)
    with pytest.raises(OptionsError, match=r"k = 11 for point clouds of 10 points.*--knn_k.*--num_points"):
        knn(points, 11)
    with pytest.raises(OptionsError, match="k = 0"):
        knn(points, 0)
    with pytest.raises(OptionsError, match="--knn_chunk must be at least 1"):
        knn(points, 3, chunk_size=0)
    with pytest.raises(ValueError, match=r"\(B, C, N\)"):
        knn(points[0], 3)
    model = make_model(point_opts(knn_k=20), classes=[4]).eval()
    with pytest.raises(OptionsError, match="--knn_k"):
        model(torch.rand(1, 9, 16))
    with pytest.raises(OptionsError, match="--knn_k must be at least 1"):
        make_model(point_opts(knn_k=0), classes=[4])
    with pytest.raises(OptionsError, match="--knn_chunk must be at least 1"):
        make_model(point_opts(knn_chunk=-5), classes=[4])
    assert make_model(point_opts(knn_chunk=0), classes=[4]).body.edge_convs[0].chunk_size is None


def test_knn_never_holds_more_distance_rows_than_the_chunk(monkeypatch):
    shapes = []
    cdist = torch.cdist

    def recording_cdist(a, b, *args, **kwargs):
        out = cdist(a, b, *args, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch, "cdist", recording_cdist)
    points = torch.rand(3, 9, 100)
    for chunk, largest in ((30, (1, 30, 100)), (100, (1, 100, 100)), (250, (2, 100, 100))):
        shapes.clear()
        knn(points, 5, chunk_size=chunk)
        assert max(shapes, key=math.prod) == largest
        assert math.prod(largest) <= max(chunk, 100) * 100  # rows of one chunk x N: never the full batch
    shapes.clear()
    knn(points, 5)
    assert shapes == [(3, 100, 100)]


def test_knn_has_no_gradient_and_runs_in_float32_under_autocast():
    points = torch.rand(2, 9, 30, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx = knn(points.bfloat16(), 4)
    assert not idx.requires_grad
    assert torch.equal(idx, knn(points.bfloat16().float(), 4))


# --- EdgeConv ---------------------------------------------------------------------------------------------


def test_gather_neighbours_and_edge_features_by_definition():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 12)
    idx = torch.randint(0, 12, (2, 12, 4))
    gathered = gather_neighbours(x, idx)
    edges = edge_features(x, idx)
    assert gathered.shape == (2, 5, 12, 4) and edges.shape == (2, 10, 12, 4)
    for b, i, m in [(0, 0, 0), (1, 7, 3), (1, 11, 2)]:
        j = idx[b, i, m]
        assert torch.equal(gathered[b, :, i, m], x[b, :, j])
        assert torch.equal(edges[b, :5, i, m], x[b, :, j] - x[b, :, i])
        assert torch.equal(edges[b, 5:, i, m], x[b, :, i])


@pytest.mark.parametrize("norm_act", ["iabn_sync", "std"])
def test_edgeconv_equals_convolutions_on_edge_features(norm_act):
    """The factorised first layer gives what 3DPC-CISS computes: conv -> norm -> ... on [x_j - x_i, x_i],
    then the maximum over the neighbours; gradients included."""
    torch.manual_seed(0)
    block = EdgeConv(6, (16, 8), build_norm_act(norm_act), k=5).double()
    x = torch.randn(3, 6, 30, dtype=torch.float64, requires_grad=True)
    out = block(x)
    idx = knn(x, 5)
    h = block.bn1(block.conv1(block.bn0(block.conv0(edge_features(x, idx)))))
    expected = h.max(dim=-1).values
    assert out.shape == (3, 8, 30)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    (g_out,) = torch.autograd.grad(out, x, grad)
    (g_expected,) = torch.autograd.grad(expected, x, grad)
    torch.testing.assert_close(g_out, g_expected)
    torch.testing.assert_close(block.first_layer(x, idx), block.conv0(edge_features(x, idx)))


# --- the model --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return make_model(point_opts(knn_k=10), classes=[16, 5])


def test_point_model_structure_and_outputs(model):
    assert model.spatial_dims == 1 and model.classes == [16, 5] and model.head_channels == 128
    assert all(isinstance(c, torch.nn.Conv1d) and c.in_channels == 128 for c in model.cls)
    assert all(c.bias is not None for c in model.cls)  # MiB's initialisation sets the biases
    assert isinstance(model.body, DGCNN) and model.body.k == 10 and len(model.body.edge_convs) == 3
    assert [b.out_channels for b in model.body.edge_convs] == [64, 64, 64]
    assert [model.body.mlp[i].out_channels for i in (0, 2)] == [512, 256]
    assert [model.head.mlp[i].out_channels for i in (0, 2)] == [256, 128]
    assert model.head.dropout.p == 0.3 and model.body.out_channels == 448
    model.train()
    x = torch.rand(2, 9, 64)
    logits, features = model(x)
    assert logits.shape == (2, 21, 64) and features == {}
    logits, features = model(x, ret_intermediate=True)
    assert set(features) == {"body", "pre_logits", "attentions", "sem_logits_small"}
    assert features["body"].shape == (2, 448, 64) and features["pre_logits"].shape == (2, 128, 64)
    shapes = [tuple(a.shape) for a in features["attentions"]]
    assert shapes == [(2, 64, 64)] * 3 + [(2, 256, 64), (2, 128, 64)]
    assert features["attentions"][-1] is features["pre_logits"]
    assert features["sem_logits_small"] is logits  # per-point logits: nothing smaller to distil
    # The global feature (last 256 channels of the body output) is the same for every point of a cloud.
    global_feature = features["body"][:, 192:]
    torch.testing.assert_close(global_feature, global_feature[:, :, :1].expand_as(global_feature))
    torch.testing.assert_close(global_feature[:, :, 0], features["attentions"][3].max(dim=-1).values)
    bg, extra = model(x, only_bg=True)
    assert bg.shape == (2, 16, 64) and extra == {}


def test_point_model_state_dict_layout(model):
    keys = list(model.state_dict())
    body = [k for k in keys if k.startswith("body.")]
    head = [k for k in keys if k.startswith("head.")]
    cls = [k for k in keys if k.startswith("cls.")]
    assert keys == body + head + cls
    assert body[0] == "body.edge_convs.0.conv0.weight" and body[-1] == "body.mlp.3.num_batches_tracked"
    assert head[0] == "head.mlp.0.weight" and head[-1] == "head.mlp.3.num_batches_tracked"
    assert cls == ["cls.0.weight", "cls.0.bias", "cls.1.weight", "cls.1.bias"]
    state = model.state_dict()
    assert state["body.edge_convs.0.conv0.weight"].shape == (64, 18, 1, 1)  # 2 x 9 input attributes
    assert state["body.edge_convs.1.conv0.weight"].shape == (64, 128, 1, 1)
    assert state["cls.0.weight"].shape == (16, 128, 1) and state["cls.1.weight"].shape == (5, 128, 1)


def test_per_point_outputs_are_permutation_equivariant(model):
    model.eval()
    torch.manual_seed(3)
    x = torch.rand(2, 9, 80)
    perm = torch.randperm(80)
    with torch.no_grad():
        logits, features = model(x, ret_intermediate=True)
        logits_p, features_p = model(x[:, :, perm], ret_intermediate=True)
    torch.testing.assert_close(logits_p, logits[:, :, perm], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(features_p["body"], features["body"][:, :, perm], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train", [False, True])
def test_chunked_and_unchunked_models_are_identical(train):
    torch.manual_seed(0)
    unchunked = make_model(point_opts(knn_k=10, knn_chunk=0), classes=[4, 2])
    chunked = make_model(point_opts(knn_k=10, knn_chunk=17), classes=[4, 2])
    chunked.load_state_dict(unchunked.state_dict())
    assert all(b.chunk_size is None for b in unchunked.body.edge_convs)
    assert all(b.chunk_size == 17 for b in chunked.body.edge_convs)
    x = torch.rand(3, 9, 60)
    outputs, grads = [], []
    for net in (unchunked, chunked):
        net.train(train)
        torch.manual_seed(5)  # same dropout mask
        out, _ = net(x)
        out.square().mean().backward()
        outputs.append(out)
        grads.append([p.grad for p in net.parameters()])
    assert torch.equal(outputs[0], outputs[1])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("norm_act", "cls"),
    [("iabn_sync", InPlaceABNSync), ("iabn", InPlaceABN), ("abn", ABN), ("std", BatchNormAct2d)],
)
def test_point_model_norms(norm_act, cls):
    """--norm_act builds every normalisation of DGCNN, with DGCNN's leaky slope 0.2, on 3-D and 4-D input."""
    torch.manual_seed(0)
    net = make_model(point_opts(norm_act=norm_act, knn_k=4), classes=[3, 2]).train()
    norms = [m for m in net.modules() if is_norm_layer(m)]
    assert len(norms) == 3 * 2 + 2 + 2 and all(type(m) is cls for m in norms)
    assert all(m.activation == "leaky_relu" and m.activation_param == 0.2 for m in norms)
    loss = F.cross_entropy(net(torch.rand(2, 9, 16))[0], torch.randint(0, 5, (2, 16)))
    loss.backward()
    assert torch.isfinite(loss) and net.body.edge_convs[0].bn0.num_batches_tracked.item() == 1
    assert net.body.mlp[1].weight.grad is not None


def test_batch_norm_act_accepts_point_features_and_refuses_vectors():
    bn = BatchNormAct2d(4)
    x = torch.randn(3, 4, 10)
    torch.testing.assert_close(bn(x), F.leaky_relu(F.batch_norm(x, None, None, training=True), 0.01))
    with pytest.raises(ValueError, match="spatial axis"):
        bn(torch.randn(3, 4))


def test_fix_bn_freezes_every_point_norm():
    net = make_model(point_opts(knn_k=4), classes=[3])
    net.fix_bn()
    norms = [m for m in net.modules() if is_norm_layer(m)]
    assert norms and all(not m.training and not m.weight.requires_grad for m in norms)
    assert net.cls[0].weight.requires_grad and net.body.edge_convs[0].conv0.weight.requires_grad


def test_balanced_init_of_point_classifiers():
    torch.manual_seed(0)
    net = make_model(point_opts(knn_k=4), classes=[4, 3]).eval()
    b_bg = net.cls[0].bias[0].item()
    net.init_new_classifier("cpu")
    assert torch.equal(net.cls[1].weight, net.cls[0].weight[:1].expand(3, 128, 1))
    torch.testing.assert_close(net.cls[1].bias, torch.full((3,), b_bg - math.log(4)))
    torch.testing.assert_close(net.cls[0].bias[0], torch.tensor(b_bg - math.log(4)))
    with torch.no_grad():
        prob = F.softmax(net(torch.rand(2, 9, 20))[0], dim=1)
    # Background and the 3 new classes share the old background probability equally (MiB).
    torch.testing.assert_close(prob[:, 4:], prob[:, :1].expand(-1, 3, -1))


def test_multimodal_background_cosine_and_align_weight_on_point_clouds():
    torch.manual_seed(0)
    net = make_model(point_opts(knn_k=4, nb_background_modes=3), classes=[5, 2])
    assert net.classes == [3, 4, 2]
    batches = [(torch.rand(2, 9, 24), torch.randint(0, 7, (2, 24))) for _ in range(2)]
    net.init_new_classifier_multimodal("cpu", batches, "softmax_remove")
    assert net.cls[0].weight.dim() == 3 and net(torch.rand(2, 9, 24))[0].shape[1] == sum(net.classes)
    cosine = make_model(point_opts(knn_k=4, cosine=True), classes=[4, 2])
    logits, _ = cosine(torch.rand(2, 9, 24))
    assert logits.shape == (2, 6, 24)
    cosine.align_weight("old")
    rows = [c.weight.flatten(1) for c in cosine.cls]
    torch.testing.assert_close(rows[1].norm(dim=1).mean(), rows[0][1:].norm(dim=1).mean())


def test_step0_to_step1_checkpoint_of_the_point_model(tmp_path):
    torch.manual_seed(0)
    step0 = make_model(point_opts(knn_k=6), classes=[16])
    path = tmp_path / "step0.pth"
    save_checkpoint({"model_state": add_module_prefix(step0.state_dict())}, path)
    state = load_checkpoint(path)["model_state"]
    assert all(k.startswith("module.") for k in state)

    step1 = make_model(point_opts(knn_k=6), classes=[16, 5])
    old = make_model(point_opts(knn_k=6), classes=[16])
    load_model_state(step1, state, strict=False, source=str(path))
    step1.init_new_classifier("cpu")
    load_model_state(old, state, strict=True, source=str(path))
    step0.eval(), step1.eval(), old.eval()
    x = torch.rand(2, 9, 40)
    with torch.no_grad():
        logits0, logits1, logits_old = step0(x)[0], step1(x)[0], old(x)[0]
    torch.testing.assert_close(logits_old, logits0)
    # Old foreground logits unchanged; background and the new classes split the old background mass.
    torch.testing.assert_close(logits1[:, 1:16], logits0[:, 1:16])
    torch.testing.assert_close(
        torch.logsumexp(logits1[:, [0, 16, 17, 18, 19, 20]], dim=1), logits0[:, 0], rtol=1e-5, atol=1e-5
    )
    # A checkpoint of the wrong step, and an image model's checkpoint, are refused with a clear message.
    with pytest.raises(CheckpointError, match="another task or step"):
        load_model_state(old, add_module_prefix(step1.state_dict()), strict=True)
    image_model = make_model(make_opts(), classes=[16])
    with pytest.raises(CheckpointError, match=r"resnet18 body while the model is a dgcnn"):
        load_model_state(old, image_model.state_dict(), strict=True)


@pytest.mark.parametrize("norm_act", ["iabn_sync", "std"])
def test_recompute_abn_gives_the_same_point_model_gradients(norm_act):
    torch.manual_seed(0)
    plain = make_model(point_opts(knn_k=5, norm_act=norm_act), classes=[4, 2]).double().train()
    recomputed = make_model(point_opts(knn_k=5, norm_act=norm_act, recompute_abn=True), classes=[4, 2])
    recomputed = recomputed.double().train()
    recomputed.load_state_dict(plain.state_dict())
    assert all(m.recompute for m in recomputed.modules() if is_norm_layer(m))
    x = torch.rand(2, 9, 30, dtype=torch.float64)
    outputs = []
    for net in (plain, recomputed):
        torch.manual_seed(1)  # same dropout mask
        out, _ = net(x)
        out.square().mean().backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[0], outputs[1])
    for (name, p1), (_, p2) in zip(plain.named_parameters(), recomputed.named_parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, msg=name)
    torch.testing.assert_close(plain.state_dict(), recomputed.state_dict())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_point_model_on_cuda_matches_cpu_and_trains_under_fp16_autocast():
    torch.manual_seed(0)
    cpu_model = make_model(point_opts(knn_k=10), classes=[4, 2]).eval()
    cuda_model = make_model(point_opts(knn_k=10, device="cuda"), classes=[4, 2]).cuda().eval()
    cuda_model.load_state_dict(cpu_model.state_dict())
    points = torch.rand(3, 9, 500)
    assert torch.equal(
        knn(points.cuda(), 10, chunk_size=700).sort(-1).values.cpu(), knn(points, 10).sort(-1).values
    )
    with torch.no_grad():
        torch.testing.assert_close(
            cuda_model(points.cuda())[0].cpu(), cpu_model(points)[0], rtol=1e-3, atol=1e-3
        )
    cuda_model.train().to(memory_format=torch.channels_last)  # as run.py builds CUDA models
    with torch.autocast("cuda", dtype=torch.float16):
        logits, _ = cuda_model(points.cuda())
        loss = F.cross_entropy(logits.float(), torch.randint(0, 6, (3, 500), device="cuda"))
    loss.backward()
    assert torch.isfinite(loss) and cuda_model.body.edge_convs[0].conv0.weight.grad.isfinite().all()
