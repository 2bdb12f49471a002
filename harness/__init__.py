"""Our own processes, started for tests and benchmarks alike: a duckfleet server (`server`), a
local cluster behind Caddy (`cluster`), an S3-compatible server (`s3server`). The test suite
(tests/) and the benchmarks (bench/) both import it; neither imports the other."""
