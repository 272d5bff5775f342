"""gpadjoint: Gaussian-process hyperparameters by the adjoint of the Lanczos iteration.

Importing gpadjoint enables JAX's 64-bit mode so that float64 is available; every array the
package creates carries an explicit dtype (float32 or float64, chosen per run).
"""

import jax

jax.config.update("jax_enable_x64", True)

__version__ = "0.1.0"
