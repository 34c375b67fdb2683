"""Dataset readers on tiny files written in each real on-disk format; models and their files."""
import pickle

import numpy as np

import pytest
import torch

from _pipeline_data import write_cifar, write_image_folders, write_tiny_imagenet
from unidd_fast.errors import ConfigError
from unidd_fast.pipeline import config
from unidd_fast.pipeline.datasets import Batches, TensorImages, load_data, prepare_data
from unidd_fast.pipeline.models import build_model, load_checkpoint, load_teacher, model_spec, save_teacher


def _cfg(dataset, data="", size=8, **data_overrides):
    cfg = config.defaults(dataset)
    cfg.data.data, cfg.data.image_size, cfg.data.workers = str(data), size, 0
    for k, v in data_overrides.items():
        setattr(cfg.data, k, v)
    return cfg


def _check(data, num_classes, size, channels=3):
    x, y = data.train[0]
    assert x.shape == (channels, size, size) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert data.num_classes == num_classes
    assert 0 <= int(y) < num_classes
    assert data.train_labels.shape == (len(data.train),)
    xb, yb = next(iter(Batches(data.test, 4)))
    assert xb.shape[1:] == (channels, size, size) and yb.dtype == torch.long


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_reader_matches_the_pickled_pixels(tmp_path, kind):
    root = write_cifar(tmp_path, kind, classes=3, per_batch=6)
    data = load_data(_cfg(kind, root, size=32).data)
    _check(data, 3, 32)
    n_train = 6 * (5 if kind == "cifar10" else 1)
    assert len(data.train) == n_train and len(data.test) == 6
    folder = "cifar-10-batches-py/data_batch_1" if kind == "cifar10" else "cifar-100-python/train"
    with open(root / folder, "rb") as handle:
        entry = pickle.load(handle)
    first = torch.from_numpy(entry["data"][0].reshape(3, 32, 32)).float() / 255
    mean, std = torch.tensor(data.mean).view(3, 1, 1), torch.tensor(data.std).view(3, 1, 1)
    x, y = data.train[0]
    # float32 round trip of (p/255 - mean)/std: a few ulps of values of order 1
    torch.testing.assert_close(x * std + mean, first, atol=1e-5, rtol=0)
    assert y == entry["labels" if kind == "cifar10" else "fine_labels"][0]


def test_cifar_resized_to_the_configured_side(tmp_path):
    data = load_data(_cfg("cifar10", write_cifar(tmp_path), size=8).data)
    _check(data, 3, 8)


def test_cifar_accepts_the_batches_folder_itself(tmp_path):
    write_cifar(tmp_path)
    assert load_data(_cfg("cifar10", tmp_path / "cifar-10-batches-py").data).num_classes == 3


def test_cifar_missing_files_are_named(tmp_path):
    root = write_cifar(tmp_path)
    (root / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(ConfigError, match="test_batch.*torchvision's CIFAR layout"):
        load_data(_cfg("cifar10", root).data)
    with pytest.raises(ConfigError, match="cifar-100-python"):
        load_data(_cfg("cifar100", tmp_path / "nowhere").data)


def test_cifar_reader_refuses_pickled_code(tmp_path):
    root = write_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(root / "cifar-10-batches-py" / "data_batch_3", "wb") as handle:
        pickle.dump({"data": Evil(), "labels": [0]}, handle)
    with pytest.raises(ConfigError, match="refusing to load builtins.print"):
        load_data(_cfg("cifar10", root).data)


def test_tiny_imagenet_val_annotations(tmp_path):
    root, annotations = write_tiny_imagenet(tmp_path, size=16)
    data = load_data(_cfg("tiny-imagenet", root, size=16).data)
    _check(data, 3, 16)
    assert data.classes == ["n01", "n02", "n03"]
    assert len(data.train) == 12 and len(data.test) == len(annotations)
    expected = [data.classes.index(wnid) for _, wnid in annotations]
    assert [data.test[i][1] for i in range(len(data.test))] == expected
    # --data may also name the directory above tiny-imagenet-200/
    assert load_data(_cfg("tiny-imagenet", root / "tiny-imagenet-200", size=16).data).num_classes == 3


def test_tiny_imagenet_bad_annotation_line(tmp_path):
    root, _ = write_tiny_imagenet(tmp_path)
    (root / "tiny-imagenet-200" / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(ConfigError, match="val_annotations.txt:1"):
        load_data(_cfg("tiny-imagenet", root).data)


@pytest.mark.parametrize("dataset", ["imagenet", "folder"])
def test_image_folder_readers(tmp_path, dataset):
    root = write_image_folders(tmp_path, size=12)
    data = load_data(_cfg(dataset, root, size=8).data)
    _check(data, 3, 8)
    assert data.classes == ["cat", "dog", "emu"]
    assert sorted(data.train_labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4


def test_folder_accepts_test_split_and_one_channel(tmp_path):
    root = write_image_folders(tmp_path, splits=("train", "test"))
    data = load_data(_cfg("folder", root, size=8, channels=1, mean=(0.5,), std=(0.25,)).data)
    _check(data, 3, 8, channels=1)


def test_image_folder_errors_say_what_is_expected(tmp_path):
    with pytest.raises(ConfigError, match="train/<class>/<image> and val/<class>"):
        load_data(_cfg("imagenet", tmp_path / "missing").data)
    write_image_folders(tmp_path / "a", classes=("cat", "dog"), splits=("train",))
    write_image_folders(tmp_path / "a", classes=("cat", "cow"), splits=("val",))
    with pytest.raises(ConfigError, match="different class folders"):
        load_data(_cfg("imagenet", tmp_path / "a").data)
    with pytest.raises(ConfigError, match="needs --data PATH"):
        load_data(_cfg("cifar10").data)


def test_digits_split_is_stratified_and_normalised():
    cfg = _cfg("digits", size=16)
    data = prepare_data(cfg)
    assert len(data.train) + len(data.test) == 1797 and data.num_classes == 10
    counts = torch.bincount(data.train_labels, minlength=10).float()
    assert counts.min() / counts.max() > 0.9  # stratified: each class ~75% of its ~180 images
    x = torch.stack([data.train[i][0] for i in range(len(data.train))])
    assert x.shape[1:] == (1, 16, 16)
    # normalised with the train split's own statistics (recorded back into the config)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    assert cfg.data.mean == data.mean and len(cfg.data.mean) == 1


def test_shapes_are_generated_balanced_deterministic_and_normalised(monkeypatch):
    from unidd_fast.pipeline import datasets, shapes

    monkeypatch.setattr(datasets, "SHAPES_TRAIN_PER_CLASS", 6)
    monkeypatch.setattr(datasets, "SHAPES_TEST_PER_CLASS", 2)
    cfg = _cfg("shapes", size=16)
    data = prepare_data(cfg)  # no --data: generated in process
    assert (len(data.train), len(data.test), data.classes) == (60, 20, list(shapes.CLASSES))
    assert torch.bincount(data.train_labels, minlength=10).tolist() == [6] * 10
    x = data.train.batch(torch.arange(60))[0]
    assert x.shape == (60, 3, 16, 16) and abs(float(x.mean())) < 1e-4
    assert cfg.data.mean == data.mean and len(cfg.data.mean) == 3
    images, labels = shapes.generate(3, 16, seed=5)
    again, _ = shapes.generate(3, 16, seed=5)
    assert (images == again).all() and not (images == shapes.generate(3, 16, seed=6)[0]).all()
    assert images.dtype == np.uint8 and images.shape == (30, 3, 16, 16) and labels.tolist()[:10] == list(range(10))
    with pytest.raises(ConfigError, match="3 channels"):
        load_data(_cfg("shapes", channels=1).data)


def test_tensor_images_batch_equals_items(gen):
    images = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8, generator=gen)
    ds = TensorImages(images, torch.arange(5), (0.2, 0.3, 0.4), (0.5, 0.6, 0.7), size=4)
    xb, yb = ds.batch(torch.tensor([3, 1]))
    torch.testing.assert_close(xb[0], ds[3][0])
    assert yb.tolist() == [3, 1]
    batches = Batches(ds, 2, shuffle=True, generator=gen, drop_last=True)
    assert len(batches) == 2 and sum(x.shape[0] for x, _ in batches) == 4


def test_resnet_small_image_stem_and_convnet_shapes():
    resnet = build_model("resnet18", 7, 32, channels=1)
    assert resnet.conv1.kernel_size == (3, 3) and resnet.conv1.stride == (1, 1)
    assert isinstance(resnet.maxpool, torch.nn.Identity)
    assert resnet(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert build_model("resnet18", 7, 224).conv1.kernel_size == (7, 7)
    net = build_model("convnet", 4, 16, channels=3, width=8, depth=2)
    assert net(torch.randn(3, 3, 16, 16)).shape == (3, 4)
    with pytest.raises(ConfigError, match="divisible by 4"):
        build_model("convnet", 4, 10, width=8, depth=2)


def test_teacher_file_round_trip(tmp_path):
    spec = model_spec("convnet", 3, 8, 3, 8, 1)
    model = build_model("convnet", 3, 8, 3, 8, 1)
    save_teacher(tmp_path / "t.safetensors", model, spec)
    loaded, spec2 = load_teacher(tmp_path / "t.safetensors")
    assert spec2 == spec and not loaded.training
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="does not exist"):
        load_teacher(tmp_path / "none.safetensors")


def test_load_checkpoint_weights_only(tmp_path):
    source = build_model("convnet", 3, 8, 3, 8, 1)
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "ck.pt")
    target = build_model("convnet", 3, 8, 3, 8, 1)
    load_checkpoint(target, tmp_path / "ck.pt")
    for a, b in zip(source.state_dict().values(), target.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="does not fit a ConvNet"):
        load_checkpoint(build_model("convnet", 5, 8, 3, 8, 1), tmp_path / "ck.pt")
    torch.save({"net": source}, tmp_path / "pickled.pt")  # a whole module: refused by weights_only
    with pytest.raises(ConfigError, match="weights-only"):
        load_checkpoint(target, tmp_path / "pickled.pt")
