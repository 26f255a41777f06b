"""The ``perturb`` fixture gives the same values in every process (hash(str) would not)."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp
    from tests.conftest import _perturb
    variables = {
        "params": {"block": {"kernel": jnp.ones((2, 2)), "scale": jnp.ones(3),
                             "transform_5to3": jnp.zeros((9, 9))}},
        "batch_stats": {"bn": {"mean": jnp.zeros(4), "var": jnp.ones(4)}},
    }
    out = _perturb(variables, jax.random.key(0))
    print(json.dumps(jax.tree.map(lambda x: x.tolist(), out)))
""")


def _values(hash_seed):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", PYTHONHASHSEED=str(hash_seed))
  out = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout.strip().splitlines()[-1]


def test_perturb_is_the_same_under_different_hash_seeds():
  first, second = _values(1), _values(2)
  assert first == second
  assert '"mean": [0.0, 0.0, 0.0, 0.0]' not in first  # it did perturb
