"""The README's own-images recipe (examples/my_images.yaml) loads, and its documented
commands run: train on a folder, save, convert, evaluate the .tflite on a folder."""
import re
from pathlib import Path

import yaml

from glt_keras import cli
from glt_keras.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "my_images.yaml"


def test_readme_shows_the_example_recipe():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- example-recipe:start -->\n```yaml\n(.*?)```\n<!-- example-recipe:end -->", readme, re.S)
    assert block, "README lost its example recipe"
    assert yaml.safe_load(block.group(1)) == yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))


def test_example_recipe_trains_on_a_folder_and_exports(image_folder, tmp_path, monkeypatch):
    from glt_keras.models import load_weights
    from glt_keras.training import train

    recipe = load_recipe(EXAMPLE)
    assert recipe.data["train"] == {"folder": "my_photos/train"} and recipe.model["topology"] == "glt96"
    # The documented layout, with the test's two classes (16x16 images: any size is resized).
    photos = tmp_path / "my_photos"
    photos.mkdir()
    for split in ("train", "test"):
        (photos / split).symlink_to(image_folder, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    recipe = recipe.with_changes(classes=["bright", "dark"])
    summary = train(recipe, out_dir=tmp_path / "runs" / "my_images", epochs=1, batch_size=8,
                    steps_per_epoch=1, verbose=0)
    assert summary["epochs"] == 1
    run = tmp_path / "runs" / "my_images"
    assert cli.main(["eval", str(run), "--data", "my_photos/test"]) == 0
    # The README's save step, then convert and evaluate the .tflite on the folder.
    model = load_recipe(run / "recipe.yaml").build_model(split_groups=False)
    load_weights(model, run / "best_weights.h5")
    model.save("my_images.h5")
    assert cli.main(["convert", "my_images.h5", "-o", "my_images.tflite", "--strict"]) == 0
    assert cli.main(["eval", "my_images.tflite", "--data", "my_photos/test"]) == 0
    assert cli.main(["export-c", "my_images.h5", "-o", "my_images_c", "--check", "1"]) == 0
    assert (tmp_path / "my_images_c").is_dir()
