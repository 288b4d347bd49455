"""Only the native part of the build; the project metadata is in setup.cfg."""
from setuptools import Extension, setup

setup(ext_modules=[
    # The TCMU ring loop in a native thread (target/tcmu/_nativering.c;
    # why a CPython extension and not cffi/ctypes: see setup.cfg).
    # optional: without a compiler the install still works and the handler
    # runs the Python ring loop (it logs a warning saying so)
    Extension("target.tcmu._nativering", ["target/tcmu/_nativering.c"],
              extra_compile_args=["-O2", "-Wall"], optional=True),
    # An RBD image's aio submitter thread without the GIL
    # (restore_core/stores/_rbdaio.c); optional the same way: without it
    # the RBD store runs restore_core.stores.rbd_submit.PySubmitter
    Extension("restore_core.stores._rbdaio", ["restore_core/stores/_rbdaio.c"],
              depends=["restore_core/stores/rbdaio_api.h"],
              extra_compile_args=["-O2", "-Wall"], optional=True),
    # plain iSCSI READs answered in C (target/iscsi/_nativelane.c,
    # docs/native-lane.md); optional: without it every PDU takes Python's path
    Extension("target.iscsi._nativelane", ["target/iscsi/_nativelane.c"],
              depends=["restore_core/stores/rbdaio_api.h"],
              extra_compile_args=["-O2", "-Wall"], optional=True),
])
