-- The MLflow backend lives beside the campaign store in the same server.
CREATE DATABASE mlflow OWNER xrdmatch;
