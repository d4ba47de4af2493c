"""Kernel sources: built-in specs and user kernels share one protocol; user kernels are budgeted by what they are."""

import jax
import jax.numpy as jnp

from kernelscale import kernels
from kernelscale.gram.plan import sub_block_size
from kernelscale.kernels.source import CallableKernel, KernelSource, peak_live_bytes, traced_bytes_per_pair

BUDGET = 64 * 2**20  # bytes per kernel call: small enough that no kernel call reaches the 2048 cap


def test_specs_and_callables_are_kernel_sources():
    spec = kernels.parse_arch("fc:depth=2")
    user = CallableKernel(kernels.network(spec)[2], "my-fc")
    assert isinstance(spec, KernelSource) and isinstance(user, KernelSource)
    assert user.to_json() == {"arch": "callable", "params": {"kernel_id": "my-fc"}, "kernel": "ntk"}
    assert user.canonical() == '{"arch":"callable","kernel":"ntk","params":{"kernel_id":"my-fc"}}'


def test_user_fc_kernel_fn_gets_kernel_calls_within_1_5x_of_the_builtin_fc():
    spec = kernels.parse_arch("fc:depth=3")
    shape = (28, 28, 1)
    user = CallableKernel(kernels.network(spec)[2], "user-fc")  # neural-tangents' own fc kernel, as user code
    builtin_side = sub_block_size(4096, spec.bytes_per_pair(shape), BUDGET)
    user_side = sub_block_size(4096, user.bytes_per_pair(shape), BUDGET)
    assert builtin_side >= 1000
    assert builtin_side / 1.5 <= user_side <= builtin_side


def test_user_conv_kernel_fn_is_budgeted_by_its_spatial_covariance_not_as_fc():
    spec = kernels.parse_arch("convnet:depth=2")
    user = CallableKernel(kernels.network(spec)[2], "user-conv")
    # neural-tangents keeps (n1, n2, H*W, H*W) covariances: 4 bytes per spatial pair per live array, at least one
    assert user.bytes_per_pair((8, 8, 3)) >= 4 * (8 * 8) ** 2


def test_peak_live_bytes_of_a_chain_counts_what_is_alive_at_once():
    def chain(x):  # x (n,) float32: a, b alive together, then c from b
        a = x * 2.0
        b = a + 1.0
        return jnp.sum(b * x)

    jaxpr = jax.make_jaxpr(chain)(jax.ShapeDtypeStruct((1000,), "float32")).jaxpr
    # x and a alive while b is made (3 arrays of 4000 bytes); never more
    assert peak_live_bytes(jaxpr) == 3 * 4000


def test_traced_bytes_per_pair_of_an_outer_product_kernel_is_the_minimum():
    def linear(x1, x2):
        return x1.reshape(len(x1), -1) @ x2.reshape(len(x2), -1).T

    assert traced_bytes_per_pair(jax.jit(linear), (4, 4, 1)) == 64
