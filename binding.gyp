# Builds build/Release/hostio.node from native/hostio.c, native/sender.c and native/writer.c
# (plain C, N-API v8).
# Run by scripts/build-native.mjs at install time; loaded by
# drivers/file/host-io.ts, which falls back to plain I/O when it is missing.
{
  "targets": [
    {
      "target_name": "hostio",
      "sources": ["native/hostio.c", "native/sender.c", "native/writer.c"],
      "libraries": ["-lpthread"],
      "cflags": ["-Wall", "-Wextra"],
      "cflags_c": ["-std=gnu11"],
      "xcode_settings": {
        "WARNING_CFLAGS": ["-Wall", "-Wextra"]
      }
    }
  ]
}
