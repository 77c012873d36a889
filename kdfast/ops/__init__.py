"""The backend ops: the C++ CPU op and the Triton op behind one resolver (:mod:`.backends`).

:mod:`.fused_op` holds what every fused op shares (fake kernels, the saved-gradient
autograd, the adapter from a ``LossConfig`` to the op's arguments); :mod:`.cpu`,
:mod:`.cpu_correlation`, :mod:`.cpu_grouped_kd` and :mod:`.triton` are the ops themselves.
"""
