"""``glt-keras teachers cache``: fill a recipe's teacher view cache ahead of training."""
from __future__ import annotations

from ..cli import positive_int


def cmd_cache(args):
    from ..recipe import load_recipe
    from .splits import load_splits
    from .teachers import recipe_teachers
    from .view_cache import ensure_view_cache, view_count

    recipe = load_recipe(args.recipe)  # a bad recipe fails before TensorFlow starts
    if not recipe.kd.get("teachers"):
        raise ValueError(f"recipe {recipe.name}: kd.teachers names no teacher file; there is nothing to cache.")
    views = args.views or view_count(recipe)
    if not views:
        raise ValueError(f"recipe {recipe.name}: kd.view_cache is not set; add `view_cache: K` (views per "
                         "image) under kd, or pass --views K.")
    recipe = recipe.with_changes(kd={"view_cache": views})
    ensemble = recipe_teachers(recipe)
    x = load_splits(recipe, data_dir=args.data_dir, subset=args.subset).train[0]
    cache = ensure_view_cache(recipe, x, ensemble, cache_dir=args.cache_dir, workers=args.workers)
    print(f"{recipe.name}: {cache.path} ({len(x):,} images x {views} views, {ensemble}).")


def register(subparsers):
    p = subparsers.add_parser("teachers", help="teacher files (kd.teachers): fill the per-view teacher cache")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    c = actions.add_parser(
        "cache", help="label the fixed augmented views of a recipe's training images with its teachers, once "
                      "(kd.view_cache); resumable, reused by every recipe with the same data, views and teachers")
    c.add_argument("recipe", help="zoo recipe name or path to a recipe .yaml with kd.teachers")
    c.add_argument("--views", type=positive_int, help="views per image (default: the recipe's kd.view_cache)")
    c.add_argument("--workers", type=positive_int, help="threads, each with its own teachers (default: every core)")
    c.add_argument("--cache-dir", help="cache folder (default $GLT_CACHE_DIR/teacher_views, else "
                                       "~/.cache/glt_keras/teacher_views)")
    c.add_argument("--data-dir", help="folder with the data archives (default $GLT_DATA_DIR or ../shared/data)")
    c.add_argument("--subset", type=positive_int, help="at most this many images per split (as train --subset)")
    c.set_defaults(func=cmd_cache)
