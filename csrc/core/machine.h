// What the planner needs to know about the machine it runs on: the data caches one
// core sees (the register tile, from the ISA's register count, is in kernels.h).
#pragma once

#include <cstdint>
#include <string>

namespace mnv2 {

// Bytes of cache one core has to itself (l1d, l2) or shares (l3_per_core: the L3 divided
// among the CPUs that share it).
struct CacheSizes {
  int64_t l1d = 0, l2 = 0, l3_per_core = 0;
};

// Used where the machine does not report a size: a 2020s x86 server core's (AMD Zen 3).
constexpr CacheSizes kDefaultCacheSizes{32 * 1024, 512 * 1024, 4 * 1024 * 1024};

// This machine's caches, read once: MNV2_CACHE_KIB="l1d,l2,l3_per_core" (KiB) when set,
// else Linux's /sys/devices/system/cpu/cpu0/cache, else sysconf, each size missing there
// from kDefaultCacheSizes. Throws std::runtime_error for a malformed MNV2_CACHE_KIB.
const CacheSizes& machine_caches();
// The same from a MNV2_CACHE_KIB-style string ("48,2048,4096"); nullptr or "" gives the
// detected sizes. Throws std::runtime_error, naming the problem, for anything else.
CacheSizes parse_cache_kib(const char* text);
// Where machine_caches() took its sizes from: "MNV2_CACHE_KIB", "sysfs", "sysconf",
// "default", or a mix such as "sysfs+default".
const std::string& machine_caches_source();

}  // namespace mnv2
