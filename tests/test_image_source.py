"""One image source: training (``diffusers_ve.data``) and ``python -m diffusers_ve.evaluate`` read folders and
``datasets`` columns through the same code: the same files (recursive), the same column names, the same channel
policy and the same one-line error for images of different sizes."""

import numpy as np
import pytest
import torch
from PIL import Image

import diffusers_ve
from diffusers_ve.data import (IMAGE_COLUMNS, ChannelMismatchError, ImageDataset, ImageSource, ImageTransform,
                               check_sizes_message, image_splits)
from diffusers_ve.evaluate import main, open_data
from diffusers_ve.mixture import MixtureUNet, digits_mixture


def _grey(path, value, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8), "L").save(path)


@pytest.fixture(scope="module")
def grey_model(tmp_path_factory):
    """A 1-channel likelihood pipeline folder (the digits mixture's exact denoiser: no training)."""
    root = tmp_path_factory.mktemp("source")
    sch = diffusers_ve.VEScheduler()
    unet = MixtureUNet.from_mixture(digits_mixture(), sch.config)
    diffusers_ve.VELikelihoodPipeline(unet=unet, scheduler=sch).save_pretrained(root / "model")
    return str(root / "model")


def test_folders_are_read_recursively_by_both(tmp_path):
    for i, rel in enumerate(["a.png", "sub/b.png", "sub/deeper/c.png", "z.png"]):
        _grey(tmp_path / "imgs" / rel, 10 * i)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    train = ImageSource.from_folder(str(tmp_path / "imgs"), channels=1)
    evaluated = open_data(str(tmp_path / "imgs"), channels=1)
    assert len(train) == len(evaluated) == 4
    tf = ImageTransform(8, 1, center_crop=True, resample="nearest")
    trained = ImageDataset(train, tf)
    for i in range(4):  # the same image at the same index; training's [-1, 1] is evaluate's levels
        assert torch.equal(torch.round((trained[i] + 1) * 127.5).to(torch.uint8), evaluated[i])
    assert sorted(int(evaluated[i].max()) for i in range(4)) == [0, 10, 20, 30]


def test_the_same_column_names(tmp_path):
    import datasets

    images = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8)
    for name in IMAGE_COLUMNS:
        ds = datasets.Dataset.from_dict({"label": [0, 1], name: images.tolist()})
        assert ImageSource.from_split(ds, channels=1).column == name
        ds.save_to_disk(str(tmp_path / name))
        assert torch.equal(open_data(str(tmp_path / name), channels=1)[1], torch.as_tensor(images[1])[None])
    ds = datasets.Dataset.from_dict({"pixels": images.tolist()})
    with pytest.raises(ValueError, match=r"`--image_column` must be one of the data set's columns \['pixels'\]"):
        ImageSource.from_split(ds, flag="--image_column")
    ds.save_to_disk(str(tmp_path / "other"))
    with pytest.raises(ValueError, match=r"`--image-column` must be one of the data set's columns \['pixels'\]"):
        open_data(str(tmp_path / "other"))


def test_the_same_channel_policy(tmp_path, grey_model, capsys):
    (tmp_path / "rgb").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8), "RGB").save(tmp_path / "rgb" / "colour.png")
    _grey(tmp_path / "grey" / "g.png", 7)
    for source in (ImageSource.from_folder(str(tmp_path / "rgb"), channels=1),
                   open_data(str(tmp_path / "rgb"), channels=1)):
        with pytest.raises(ChannelMismatchError, match="colour.png: a colour image .* in_channels=1"):
            source[0]
    # grey for a colour model: replicated, in both
    grey3 = open_data(str(tmp_path / "grey"), channels=3)[0]
    assert grey3.shape == (3, 8, 8) and (grey3 == 7).all()
    assert ImageSource.from_folder(str(tmp_path / "grey"), channels=3)[0].mode == "RGB"
    with pytest.raises(SystemExit) as exit_:
        main(["--model", grey_model, "--data", str(tmp_path / "rgb"), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert exit_.value.code == 2 and len(lines) == 1 and "a colour image" in lines[0] and "Traceback" not in err


def test_mixed_sizes_are_one_error_line(tmp_path, grey_model, capsys):
    _grey(tmp_path / "mixed" / "a.png", 3, (8, 8))
    _grey(tmp_path / "mixed" / "b.png", 3, (6, 10))
    data = open_data(str(tmp_path / "mixed"), channels=1)
    assert data[0].shape == (1, 8, 8)
    with pytest.raises(ValueError) as e:
        data[1]
    assert str(e.value) == check_sizes_message(str(tmp_path / "mixed" / "b.png"), (6, 10),
                                               str(tmp_path / "mixed" / "a.png"), (8, 8))
    with pytest.raises(SystemExit) as exit_:
        main(["--model", grey_model, "--data", str(tmp_path / "mixed"), "--output-dir", str(tmp_path / "o"),
              "--num-levels", "256", "--num-t-samples", "2"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert exit_.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "images of different sizes" in lines[0] and "--resolution" in lines[0]
    # with --resolution (as training always resizes) the same folder is read
    tf = ImageTransform(8, 1, center_crop=True, resample="nearest")
    assert open_data(str(tmp_path / "mixed"), channels=1, transform=tf)[1].shape == (1, 8, 8)


def test_training_splits_of_a_datasets_name(monkeypatch):
    """image_splits (the training script's reader of --dataset_name): the column found as evaluate finds it, the
    test split held out (at most max_held), or a fixed split of train when there is none."""
    import datasets

    grey = [np.full((8, 8), i, np.uint8).tolist() for i in range(20)]
    both = datasets.DatasetDict(train=datasets.Dataset.from_dict({"pixel_values": grey}),
                                test=datasets.Dataset.from_dict({"pixel_values": grey[:5]}))
    monkeypatch.setattr(datasets, "load_dataset", lambda name, **kw: both if name == "both" else
                        datasets.DatasetDict(train=both["train"]))
    train, held = image_splits(dataset_name="both", channels=1, max_held=3)
    assert (len(train), len(held), train.column) == (20, 3, "pixel_values")
    assert torch.equal(torch.as_tensor(held[2]), torch.full((8, 8), 2, dtype=torch.uint8))
    train, held = image_splits(dataset_name="only-train", channels=1, eval_fraction=0.1, min_held=4)
    levels = sorted(int(np.asarray(s[i]).max()) for s in (train, held) for i in range(len(s)))
    assert (len(train), len(held)) == (16, 4) and levels == list(range(20))  # a partition of the 20 images
