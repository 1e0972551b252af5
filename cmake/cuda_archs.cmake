# FDP_CUDA_ARCHS=auto -> the compute capabilities of the GPUs nvidia-smi sees; with no GPU visible, none
# (the extension is then not built: nothing here could run it, and the portable list costs minutes of
# compiling). FDP_CUDA_ARCHS=portable -> FDP_PORTABLE_CUDA_ARCHS. Included by CMakeLists.txt; runs in
# script mode too (cmake -P), which is how tests/test_extension.py checks it with a stand-in nvidia-smi.
if(FDP_CUDA_ARCHS STREQUAL "portable")
  set(FDP_CUDA_ARCHS "${FDP_PORTABLE_CUDA_ARCHS}")
  message(STATUS "fdp: FDP_CUDA_ARCHS=portable: building ${FDP_CUDA_ARCHS}")
  return()
endif()
if(NOT FDP_CUDA_ARCHS STREQUAL "auto")
  return()
endif()
# Only the architectures of the GPUs present: one compiles in about a third of the CPU time of the
# portable list (README). nvidia-smi reports compute capabilities as "8.6".
execute_process(COMMAND nvidia-smi --query-gpu=compute_cap --format=csv,noheader
                RESULT_VARIABLE _smi_rc OUTPUT_VARIABLE _smi_out ERROR_QUIET)
string(REGEX MATCHALL "[0-9]+\\.[0-9]+" _caps "${_smi_out}")
if(_smi_rc EQUAL 0 AND _caps)
  list(TRANSFORM _caps REPLACE "\\." "")
  list(REMOVE_DUPLICATES _caps)
  set(FDP_CUDA_ARCHS "${_caps}")
  message(STATUS "fdp: FDP_CUDA_ARCHS=auto: the GPUs present are ${FDP_CUDA_ARCHS}")
else()
  set(FDP_CUDA_ARCHS "")
  message(STATUS "fdp: FDP_CUDA_ARCHS=auto: no GPU visible (nvidia-smi), so no CUDA extension is built; set "
                 "FDP_CUDA_ARCHS to build it (e.g. 90 for H100, 87 for Jetson Orin, or portable for "
                 "${FDP_PORTABLE_CUDA_ARCHS})")
endif()
