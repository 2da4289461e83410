"""What the tests share, by concern: `services` (throwaway real servers and processes),
`http` (requests, forms and problem checks), `jobs` (a whole job stack and job records),
`envelope` (keyrings and the geometry of a message), `seals` (watching every AES-GCM
sealing), `memory` (peak resident memory) and `metrics` (scraping /metrics)."""
