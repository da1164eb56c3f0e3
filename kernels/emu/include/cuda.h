// The emulator's stand-in for <cuda.h>: everything is in cuda_emu.h.
#pragma once
#include "cuda_emu.h"
