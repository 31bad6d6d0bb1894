// Cache sizes of the machine the kernels run on.
#include "machine.h"

#include <unistd.h>

#include <algorithm>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>

namespace mnv2 {
namespace {

// "48K", "2048K", "32M", "1024" (bytes) as sysfs writes them; 0 when unreadable.
int64_t parse_size(const std::string& text) {
  char* end = nullptr;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  if (end == text.c_str() || v <= 0) return 0;
  const char unit = *end;
  if (unit == 'K' || unit == 'k') return v * 1024;
  if (unit == 'M' || unit == 'm') return v * 1024 * 1024;
  if (unit == 'G' || unit == 'g') return v * 1024 * 1024 * 1024;
  return v;
}

std::string read_line(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

// CPUs in a sysfs list such as "0-3,8-11".
int64_t count_cpus(const std::string& list) {
  int64_t n = 0;
  std::stringstream ss(list);
  std::string part;
  while (std::getline(ss, part, ',')) {
    int a = 0, b = 0;
    if (std::sscanf(part.c_str(), "%d-%d", &a, &b) == 2 && b >= a) {
      n += b - a + 1;
    } else if (std::sscanf(part.c_str(), "%d", &a) == 1) {
      n += 1;
    }
  }
  return n;
}

// cpu0's data and unified caches from sysfs; sizes not found stay 0.
CacheSizes from_sysfs() {
  CacheSizes c;
  for (int index = 0; index < 16; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    const std::string level = read_line(dir + "level");
    if (level.empty()) break;
    const std::string type = read_line(dir + "type");
    if (type == "Instruction") continue;
    const int64_t size = parse_size(read_line(dir + "size"));
    const int64_t sharing = count_cpus(read_line(dir + "shared_cpu_list"));
    if (level == "1") c.l1d = size;
    if (level == "2") c.l2 = size;
    if (level == "3") c.l3_per_core = sharing > 0 ? size / sharing : size;
  }
  return c;
}

CacheSizes from_sysconf() {
  CacheSizes c;
#if defined(_SC_LEVEL1_DCACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE) && defined(_SC_LEVEL3_CACHE_SIZE)
  c.l1d = std::max<long>(0, sysconf(_SC_LEVEL1_DCACHE_SIZE));
  c.l2 = std::max<long>(0, sysconf(_SC_LEVEL2_CACHE_SIZE));
  const long online = sysconf(_SC_NPROCESSORS_ONLN);
  c.l3_per_core = std::max<long>(0, sysconf(_SC_LEVEL3_CACHE_SIZE)) / std::max<long>(1, online);
#endif
  return c;
}

struct Detected {
  CacheSizes sizes;
  std::string source;
};

Detected detect() {
  const char* env = std::getenv("MNV2_CACHE_KIB");
  if (env != nullptr && env[0] != '\0') return {parse_cache_kib(env), "MNV2_CACHE_KIB"};
  Detected d{from_sysfs(), "sysfs"};
  const CacheSizes sc = from_sysconf();
  bool used_sysconf = false, used_default = false;
  auto fill = [&](int64_t& v, int64_t from_sc, int64_t fallback) {
    if (v > 0) return;
    if (from_sc > 0) {
      v = from_sc;
      used_sysconf = true;
    } else {
      v = fallback;
      used_default = true;
    }
  };
  const bool none = d.sizes.l1d == 0 && d.sizes.l2 == 0 && d.sizes.l3_per_core == 0;
  fill(d.sizes.l1d, sc.l1d, kDefaultCacheSizes.l1d);
  fill(d.sizes.l2, sc.l2, kDefaultCacheSizes.l2);
  fill(d.sizes.l3_per_core, sc.l3_per_core, kDefaultCacheSizes.l3_per_core);
  if (none) d.source.clear();
  if (used_sysconf) d.source += d.source.empty() ? "sysconf" : "+sysconf";
  if (used_default) d.source += d.source.empty() ? "default" : "+default";
  return d;
}

const Detected& detected() {
  static const Detected d = detect();
  return d;
}

}  // namespace

CacheSizes parse_cache_kib(const char* text) {
  if (text == nullptr || text[0] == '\0') return machine_caches();
  long long v[3] = {0, 0, 0};
  char tail = 0;
  if (std::sscanf(text, "%lld,%lld,%lld%c", &v[0], &v[1], &v[2], &tail) != 3 || v[0] <= 0 || v[1] <= 0 ||
      v[2] <= 0) {
    throw std::runtime_error(std::string("MNV2_CACHE_KIB=") + text +
                             ": expected three positive sizes in KiB, \"l1d,l2,l3_per_core\" (e.g. 48,2048,4096)");
  }
  return CacheSizes{v[0] * 1024, v[1] * 1024, v[2] * 1024};
}

const CacheSizes& machine_caches() { return detected().sizes; }

const std::string& machine_caches_source() { return detected().source; }

}  // namespace mnv2
