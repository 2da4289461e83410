"""What the tests share, one module a concern: `services` (throwaway real servers and
processes) and `audited` (a server whose file writes are reported), `http` (requests,
forms and problem checks), `jobs` (a whole job stack and job records), `s3_proxy` (an S3
proxy that fails, paces and holds), `data` (generated data, bit flips), `waiting`,
`ports`, `storage` (what a store holds), `envelope` (keyrings and where the parts of a
message lie), `seals` (watching every AES-GCM sealing), `memory` (peak resident memory),
`metrics` (scraping /metrics) and `project` (the packages pyproject.toml ships)."""
