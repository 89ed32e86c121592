"""The documented import paths work, and loading a zoo model does not pull in training."""
import subprocess
import sys
import textwrap


def run_python(code):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_training_exports_the_readme_names():
    out = run_python("""
        from glt_keras.training import train, Distiller, BlockPruning, shrink, evaluate
        import glt_keras.training as training
        from glt_keras.training import run, distill, pruning
        assert train is run.train and evaluate is run.evaluate and Distiller is distill.Distiller
        assert BlockPruning is pruning.BlockPruning and shrink is pruning.shrink
        assert {"train", "Distiller", "BlockPruning", "shrink"} <= set(training.__all__) <= set(dir(training))
        try:
            from glt_keras.training import nope
        except ImportError as err:
            print("nope:", err)
    """)
    assert "nope: cannot import name 'nope'" in out


def test_loading_a_zoo_model_does_not_import_training():
    out = run_python("""
        import sys
        import glt_keras, glt_keras.zoo as zoo
        zoo.load("vww_binary")
        print(sorted(m for m in sys.modules if m.startswith("glt_keras.training")))
    """)
    assert out.strip() == "[]"
