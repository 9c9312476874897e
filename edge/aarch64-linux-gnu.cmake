# CMake toolchain for aarch64 Linux with Debian's cross compiler (apt-get install g++-aarch64-linux-gnu); its
# sysroot is /usr/aarch64-linux-gnu, which is also qemu-aarch64's -L. tools/edge_arm_check.py uses it:
#   cmake -S edge -B build/edge-aarch64 -DCMAKE_TOOLCHAIN_FILE=edge/aarch64-linux-gnu.cmake \
#         -DEXECUTORCH_DIR=<the aarch64 executorch wheel, unpacked>/executorch
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
# The executorch package is an unpacked wheel outside the sysroot.
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64 -L /usr/aarch64-linux-gnu)
