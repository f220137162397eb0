"""Create (or update) the MLflow user that training and sampling jobs log in as: EDIT on the
jobs' experiment and registered model, nothing else, never an admin. Run it as the admin, once
per deployment; running it again sets the password and the grants again.

    MLFLOW_TRACKING_URI=http://localhost:5000 MLFLOW_TRACKING_USERNAME=admin \\
    MLFLOW_TRACKING_PASSWORD=$ADMIN_PW RNNLM_MLFLOW_USER_PASSWORD=$JOBS_PW \\
        python -m jobs.mlflow_user --username rnnlm-jobs

The new user's password comes from the environment, never from a flag (flags show in ``ps``).
"""

from __future__ import annotations

import os
from typing import Any

import click
import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.server.auth.client import AuthServiceClient

from jobs.common import JobError
from rnnlm.config import TrackingConfig

PASSWORD_ENV = "RNNLM_MLFLOW_USER_PASSWORD"
ALREADY_EXISTS = "RESOURCE_ALREADY_EXISTS"


@click.command(context_settings={"show_default": True})
@click.option("--username", default="rnnlm-jobs", help="The jobs' MLflow user.")
@click.option("--experiment", default=TrackingConfig.experiment, help="Its experiment.")
@click.option(
    "--registered-model-name", default=TrackingConfig.registered_model_name, help="Its model."
)
def main(username: str, experiment: str, registered_model_name: str) -> None:
    """Give the jobs an MLflow user of their own, with EDIT on their experiment and model."""
    password = os.environ.get(PASSWORD_ENV, "")
    if len(password) < 12:  # MLflow's own minimum for basic-auth passwords
        raise JobError(
            f"{PASSWORD_ENV}: set it to the new user's password (12 characters or more)."
        )
    uri = mlflow.get_tracking_uri()
    try:
        auth, client = AuthServiceClient(uri), MlflowClient(uri)
        _create_or_update_user(auth, username, password)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        try:
            client.create_registered_model(registered_model_name)
        except MlflowException as exc:
            if exc.error_code != ALREADY_EXISTS:
                raise
        _grant_edit(auth, username, "experiment", experiment_id)
        _grant_edit(auth, username, "registered_model", registered_model_name)
    except MlflowException as exc:
        raise JobError(f"MLflow at {uri} refused: {exc.message.splitlines()[0][:300]}") from None
    click.echo(
        f"{username}: EDIT on experiment {experiment!r} (id {experiment_id}) "
        f"and registered model {registered_model_name!r}"
    )


def _create_or_update_user(auth: AuthServiceClient, username: str, password: str) -> None:
    try:
        auth.create_user(username, password)
    except MlflowException as exc:
        if exc.error_code != ALREADY_EXISTS:
            raise
        auth.update_user_password(username, password)
    auth.update_user_admin(username, False)


def _grant_edit(auth: AuthServiceClient, username: str, kind: str, resource: Any) -> None:
    """EDIT exactly: a grant that exists with another level is replaced."""
    try:
        auth.grant_user_permission(username, kind, str(resource), "EDIT")
    except MlflowException as exc:
        if exc.error_code != ALREADY_EXISTS:
            raise
        auth.revoke_user_permission(username, kind, str(resource))
        auth.grant_user_permission(username, kind, str(resource), "EDIT")


if __name__ == "__main__":
    main()
