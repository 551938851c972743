"""Operations: Prefect work pools and deployments (``meddiff deploy``)."""
