"""Run configuration: the paper's per-dataset defaults, overrides and their errors."""
import json

import pytest

from unidd_fast.errors import ConfigError
from unidd_fast.pipeline import config


def test_defaults_follow_the_paper_tables():
    c10, c100, tiny, inet = (config.defaults(d) for d in ("cifar10", "cifar100", "tiny-imagenet", "imagenet"))
    # Table 2 (squeeze)
    assert (c10.squeeze.epochs, c100.squeeze.epochs, tiny.squeeze.epochs, inet.squeeze.epochs) == (200, 100, 50, 90)
    assert (tiny.squeeze.lr, tiny.squeeze.batch_size, inet.squeeze.scheduler) == (0.2, 256, "step")
    # Table 3 (recover)
    assert (c10.recover.beta, tiny.recover.beta, inet.recover.beta) == (0.1, 1.0, 0.1)
    assert (c10.recover.lr, tiny.recover.lr, c10.recover.betas) == (0.25, 0.1, (0.5, 0.9))
    assert (c10.recover.batch_size, c100.recover.batch_size, tiny.recover.batch_size, inet.recover.batch_size) == \
        (10, 100, 200, 500)
    # Table 4 (validation)
    assert (c10.evaluate.temperature, tiny.evaluate.temperature, inet.evaluate.epochs) == (30.0, 20.0, 300)
    assert (c100.evaluate.optimizer, c100.evaluate.lr, tiny.evaluate.lr) == ("sgd", 0.1, 0.2)
    assert inet.data.image_size == 224 and c10.data.image_size == 32 and tiny.data.image_size == 64


def test_set_value_coerces_and_checks():
    cfg = config.defaults("digits")
    config.set_value(cfg, "recover.lr", "0.5")
    config.set_value(cfg, "recover.emu", "false")
    config.set_value(cfg, "recover.betas", "0.4,0.8")
    config.set_value(cfg, "ipc", "1,5")
    assert (cfg.recover.lr, cfg.recover.emu, cfg.recover.betas, cfg.ipc) == (0.5, False, (0.4, 0.8), [1, 5])
    with pytest.raises(ConfigError, match="unknown config key 'recover.lrr'.*recover.lr"):
        config.set_value(cfg, "recover.lrr", "1")
    with pytest.raises(ConfigError, match="recover.iterations='many'"):
        config.set_value(cfg, "recover.iterations", "many")
    with pytest.raises(ConfigError, match="choose one of"):
        config.set_value(cfg, "recover.loss", "mse")
    with pytest.raises(ConfigError, match="key=value"):
        config.parse_assignment("recover.lr")


def test_json_round_trip(tmp_path):
    cfg = config.defaults("tiny-imagenet")
    config.set_value(cfg, "evaluate.cutmix", "0.5")
    cfg.write(tmp_path / "config.json")
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["data"]["dataset"] == "tiny-imagenet" and raw["evaluate"]["cutmix"] == 0.5
    assert config.load(tmp_path / "config.json") == cfg
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="unknown dataset"):
        config.defaults("mnist")


def test_cuda_graphs_on_a_cpu_run_fails_fast():
    cfg = config.defaults("digits")
    cfg.device = "cpu"
    config.set_value(cfg, "recover.cuda_graphs", "on")
    with pytest.raises(ConfigError, match="--cuda-graphs on needs a CUDA device"):
        config.validate(cfg)
    config.set_value(cfg, "recover.cuda_graphs", "auto")
    config.validate(cfg)


def test_choices_come_from_the_registries():
    from unidd_fast import filters, loss
    from unidd_fast.cli import build_parser
    from unidd_fast.pipeline import datasets

    assert config.DATASETS == tuple(datasets.READERS) and set(config.DEFAULTS) == set(config.DATASETS)
    assert config.CHOICES["data.dataset"] == config.DATASETS
    assert config.CHOICES["recover.filter"] == tuple(filters.LOSS_FILTERS) == loss.FILTERS
    assert config.CHOICES["recover.signal"] == loss.SIGNALS
    for dataset in config.DATASETS:  # every preset is valid for its dataset
        config.validate(config.defaults(dataset))
    for dataset in config.DATASETS:
        assert build_parser().parse_args(["stats", "--dataset", dataset]).dataset == dataset
    with pytest.raises(SystemExit):
        build_parser().parse_args(["stats", "--dataset", "mnist"])
