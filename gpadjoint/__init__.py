"""gpadjoint: Gaussian-process hyperparameters by the adjoint of the Lanczos iteration.

The front door is the scikit-learn estimator::

    from gpadjoint import GPRegressor

    model = GPRegressor().fit(X, y)
    mean, std = model.predict(X_test, return_std=True)

Importing gpadjoint changes no global JAX setting. ``GPRegressor`` and the ``gpadjoint``
command turn on JAX's 64-bit mode only for the duration of their own calls (``jax.enable_x64``,
a scoped setting), because the exact estimator and float64 runs need it. Code that calls the
lower-level functions (``gpadjoint.mll.neg_mll`` and friends) with float64 arrays opts in once
with ``jax.config.update("jax_enable_x64", True)``; without it JAX truncates float64 to float32.
"""

__version__ = "0.1.0"

__all__ = ["GPRegressor", "__version__"]


def __getattr__(name):
    # Lazy: `import gpadjoint` stays cheap (no JAX or scikit-learn import until needed).
    if name == "GPRegressor":
        from .model import GPRegressor

        return GPRegressor
    raise AttributeError(f"module 'gpadjoint' has no attribute {name!r}")
