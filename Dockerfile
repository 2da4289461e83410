# The sealstream image: the API (`sealstream serve`), Celery workers and beat all run it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api ./api
COPY audit ./audit
COPY cli ./cli
COPY client ./client
COPY envelope ./envelope
COPY keystore ./keystore
COPY sealstream ./sealstream
COPY sealstream_client ./sealstream_client
COPY services ./services
COPY storage ./storage
COPY workers ./workers
RUN pip install ./client . && useradd --uid 10001 --no-create-home sealstream
USER sealstream
EXPOSE 8080
CMD ["sealstream", "serve", "--host", "0.0.0.0", "--port", "8080"]
