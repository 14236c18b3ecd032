// The C++ side of tests/kernel_emulator.py, part 2: read a job, launch an entry over its grid,
// check the sentinel padding, write the outputs. Appended after the generated kernel table.
int run_job(const std::string& dir) {
  // <dir>/job.txt: variant name D K grid.x threadgroup.x n_codes codes... n_in n_out, then
  // "code count ndim dims" per input and "code count" per output; data in <dir>/in<i>.bin,
  // results in <dir>/out<i>.bin. 1-D grids only (all of tinymoe's kernels are).
  std::ifstream job(dir + "/job.txt");
  std::string variant, name;
  int D, K, n_codes, n_in, n_out;
  uint32_t gx, tx;
  job >> variant >> name >> D >> K >> gx >> tx >> n_codes;
  std::vector<int> codes(n_codes);
  for (int& c : codes) job >> c;
  job >> n_in >> n_out;
  const Entry* entry = nullptr;
  for (const auto& e : kEntries) if (name == e.name) entry = &e;
  if (!entry) return 4;
  uint32_t rx = (gx + tx - 1) / tx * tx;
  size_t pad = (size_t(rx) + 64) * 4;  // room for whatever an unguarded thread writes
  std::vector<std::vector<unsigned char>> buf(n_in + n_out);
  std::vector<std::vector<int>> shape(n_in);
  std::vector<size_t> bytes(n_in + n_out);
  std::vector<void*> ptr;
  std::vector<int*> shape_ptr;
  for (int i = 0; i < n_in + n_out; ++i) {
    int code, ndim = 0;
    size_t count;
    job >> code >> count;
    bytes[i] = count * (code == 1 || code == 2 ? 2 : 4);
    buf[i].assign(bytes[i] + pad, i < n_in ? 0x00 : 0xFF);
    ptr.push_back(buf[i].data());
    if (i >= n_in) continue;
    job >> ndim;
    shape[i].assign(ndim + 1, 0);
    for (int j = 0; j < ndim; ++j) job >> shape[i][j];
    shape_ptr.push_back(shape[i].data());
    std::ifstream f(dir + "/in" + std::to_string(i) + ".bin", std::ios::binary);
    if (bytes[i] && !f.read(reinterpret_cast<char*>(buf[i].data()), bytes[i])) return 2;
  }
  if (!job) return 2;
  const bool cuda = variant == "cuda";
  auto run = [&](uint32_t gid) {
    entry->fn(cuda, codes.data(), ptr.data(), shape_ptr.data(), ptr.data() + n_in, D, K,
              uint3{gid, 0, 0}, uint3{tx, 1, 1});
  };
  // SIMD groups: 32 consecutive threads of a threadgroup (fewer at a threadgroup's end).
  std::vector<std::pair<uint32_t, uint32_t>> groups;  // (first thread, lanes)
  for (uint32_t g0 = 0; g0 < rx; g0 += tx)
    for (uint32_t s0 = 0; s0 < tx; s0 += 32) groups.push_back({g0 + s0, std::min<uint32_t>(32, tx - s0)});
  if (!entry->simd) {
    for (auto& g : groups) for (uint32_t l = 0; l < g.second; ++l) run(g.first + l);
  } else {  // one OS thread per lane, reused for every group in turn
    SimdGroup group;
    Barrier bar(int(std::min<uint32_t>(32, tx)));
    std::vector<os_thread> threads;
    for (uint32_t l = 0; l < std::min<uint32_t>(32, tx); ++l)
      threads.emplace_back([&, l] {
        tl_group = &group;
        tl_lane = int(l);
        for (auto& g : groups) {
          if (l == 0) group.active = int(g.second);
          bar.wait();
          if (l < g.second) { run(g.first + l); group.leave(); }
          bar.wait();
        }
      });
    for (auto& t : threads) t.join();
    if (group.fault) return 5;
  }
  if (g_fault) return 5;
  for (int i = n_in; i < n_in + n_out; ++i) {
    for (size_t j = bytes[i]; j < buf[i].size(); ++j)
      if (buf[i][j] != 0xFF) return 3;  // a thread wrote past the end
    std::ofstream f(dir + "/out" + std::to_string(i - n_in) + ".bin", std::ios::binary);
    f.write(reinterpret_cast<const char*>(buf[i].data()), bytes[i]);
  }
  return 0;
}

int main(int argc, char** argv) {
  for (int a = 1; a < argc; ++a) {
    int rc = run_job(argv[a]);
    std::ofstream(std::string(argv[a]) + "/rc.txt") << rc << "\n";
  }
  return 0;
}
