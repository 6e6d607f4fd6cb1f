"""The Fargate stack, deployed to moto's CloudFormation (a real moto server, over HTTP)."""

from __future__ import annotations

import ast
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml  # moto's cloudformation extra brings PyYAML

TEMPLATE = Path(__file__).parents[2] / "deploy" / "cloudformation" / "aggregator.yaml"
REGION = "us-west-2"
MOTO_UNMODELLED = {
    "AWS::ApplicationAutoScaling::ScalableTarget",
    "AWS::ApplicationAutoScaling::ScalingPolicy",
}
"""Resource types moto's CloudFormation accepts but does not create (moto 5.2)."""
pytestmark = pytest.mark.filterwarnings("ignore:Tried to parse AWS::ApplicationAutoScaling")


@pytest.fixture(autouse=True)
def moto_knows_network_load_balancers(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto (5.2) creates every AWS::ElasticLoadBalancingV2::LoadBalancer as an application
    load balancer, ignoring its Type, and then refuses TCP and UDP listeners on it. Pass the
    Type on, as CloudFormation does; the moto server runs in this process."""
    from moto.elbv2.models import FakeLoadBalancer, elbv2_backends

    def create(resource_name: str, cloudformation_json: Any, account_id: str, region_name: str,
               **kwargs: Any) -> Any:  # fmt: skip
        props = cloudformation_json["Properties"]
        return elbv2_backends[account_id][region_name].create_load_balancer(
            resource_name, props.get("SecurityGroups"), props.get("Subnets"),
            scheme=props.get("Scheme", "internet-facing"), loadbalancer_type=props.get("Type"),
        )  # fmt: skip

    monkeypatch.setattr(FakeLoadBalancer, "create_from_cloudformation_json", create)


def client(moto_server: str, service: str) -> Any:
    return boto3.client(service, endpoint_url=moto_server, region_name=REGION)


def deploy(moto_server: str, name: str, **parameters: str) -> dict[str, Any]:
    ec2 = client(moto_server, "ec2")
    vpc = ec2.create_vpc(CidrBlock="10.42.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.42.{i}.0/24",
                                 AvailabilityZone=f"{REGION}{zone}")["Subnet"]["SubnetId"]
               for i, zone in enumerate("ab")]  # fmt: skip
    params = {"Image": "123456789012.dkr.ecr.us-west-2.amazonaws.com/aggregator:1",
              "VpcId": vpc, "VpcCidr": "10.42.0.0/16", "SubnetIds": ",".join(subnets),
              **parameters}  # fmt: skip
    cfn = client(moto_server, "cloudformation")
    cfn.create_stack(
        StackName=name, TemplateBody=TEMPLATE.read_text(),
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()],
        Capabilities=["CAPABILITY_IAM"],
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        stack: dict[str, Any] = cfn.describe_stacks(StackName=name)["Stacks"][0]
        if not stack["StackStatus"].endswith("IN_PROGRESS") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert stack["StackStatus"] == "CREATE_COMPLETE", stack.get("StackStatusReason")
    return stack


def test_the_stack_deploys_with_every_resource(moto_server: str) -> None:
    stack = deploy(moto_server, "logs-aggregator")
    cfn = client(moto_server, "cloudformation")
    resources = cfn.list_stack_resources(StackName="logs-aggregator")["StackResourceSummaries"]
    kinds = {r["LogicalResourceId"]: r["ResourceType"] for r in resources}
    template = yaml.load(TEMPLATE.read_text(), Loader=_CfnLoader)
    declared = {k: v["Type"] for k, v in template["Resources"].items()}
    assert len(resources) == len(declared)
    assert all(r["ResourceStatus"] == "CREATE_COMPLETE" for r in resources)
    # moto lists what it does not model with empty names; cfn-lint checks those in make test
    assert {k: v for k, v in kinds.items() if k} == {
        k: v for k, v in declared.items() if v not in MOTO_UNMODELLED
    }

    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}
    elb = client(moto_server, "elbv2")
    nlb = elb.describe_load_balancers()["LoadBalancers"]
    nlb = next(lb for lb in nlb if lb["DNSName"] == outputs["LoadBalancerDnsName"])
    assert (nlb["Type"], nlb["Scheme"]) == ("network", "internal")
    assert outputs["FluentdAddress"] == f"{nlb['DNSName']}:24224"
    listeners = elb.describe_listeners(LoadBalancerArn=nlb["LoadBalancerArn"])["Listeners"]
    assert sorted((li["Protocol"], li["Port"]) for li in listeners) == [
        ("TCP", 24224),
        ("UDP", 24224),
    ]
    groups = elb.describe_target_groups(LoadBalancerArn=nlb["LoadBalancerArn"])["TargetGroups"]
    for group in groups:
        assert (group["HealthCheckProtocol"], group["HealthCheckPort"],
                group["HealthCheckPath"]) == ("HTTP", "8888", "/api/health")  # fmt: skip

    ecs = client(moto_server, "ecs")
    service = ecs.describe_services(cluster=outputs["ClusterName"],
                                    services=[outputs["ServiceName"]])["services"][0]  # fmt: skip
    assert service["desiredCount"] == 2  # (moto drops LaunchType and NetworkMode)
    task = ecs.describe_task_definition(taskDefinition=service["taskDefinition"])
    container = task["taskDefinition"]["containerDefinitions"][0]
    env = {e["name"]: e["value"] for e in container["environment"]}
    assert env["STOP_TIMEOUT"] == str(container["stopTimeout"]) == "120"
    assert env["HANDOFF_ADDRESS"] == outputs["FluentdAddress"]
    # File buffers sized from the default 30 GiB of ephemeral storage, for 1 vCPU.
    assert (env["BUFFER_TYPE"], env["BUFFER_TOTAL_LIMIT"]) == ("file", "10752MiB")
    assert container["healthCheck"]["command"] == ["CMD", "aggregator", "health"]
    labels = {k.lower(): v for k, v in container["dockerLabels"].items()}  # moto camelCases keys
    assert labels["ecs_prometheus_exporter_port"] == labels["prometheus_exporter_port"] == "8888"

    iam = client(moto_server, "iam")
    role = next(r for r in resources if r["LogicalResourceId"] == "TaskRole")
    policy = iam.get_role_policy(RoleName=role["PhysicalResourceId"], PolicyName="firehose-put")
    document = policy["PolicyDocument"]  # a dict from AWS; moto 5.2 returns a Python repr
    document = ast.literal_eval(document) if isinstance(document, str) else document
    statement = document["Statement"][0]
    assert statement["Action"] == "firehose:PutRecordBatch"
    assert sorted(r.rsplit("/", 1)[1] for r in statement["Resource"]) == [
        "elasticsearch-delivery-stream", "s3-delivery-stream"]  # fmt: skip


def container_env(moto_server: str, stack: dict[str, Any], cluster: str) -> dict[str, str]:
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}
    ecs = client(moto_server, "ecs")
    service = ecs.describe_services(cluster=cluster, services=[outputs["ServiceName"]])
    task = ecs.describe_task_definition(taskDefinition=service["services"][0]["taskDefinition"])
    container = task["taskDefinition"]["containerDefinitions"][0]
    return {e["name"]: e["value"] for e in container["environment"]}


def test_the_file_buffers_are_sized_from_the_ephemeral_storage() -> None:
    """Every BufferDisk entry is (storage - 2 GiB) x 3/4 over the workers (one per vCPU, at
    least one) and the two streams, in MiB."""
    template = yaml.load(TEMPLATE.read_text(), Loader=_CfnLoader)
    storages = [int(v) for v in template["Parameters"]["EphemeralStorageGiB"]["AllowedValues"]]
    cpus = [int(v) for v in template["Parameters"]["Cpu"]["AllowedValues"]]
    table = template["Mappings"]["BufferDisk"]
    assert sorted(map(int, table)) == sorted(storages)
    for storage in storages:
        for cpu in cpus:
            workers = max(1, cpu // 1024)
            mib = (storage * 1024 - 2048) * 3 // 4 // (workers * 2)
            assert table[str(storage)][str(cpu)] == f"{mib}MiB", (storage, cpu)
            assert mib * workers * 2 <= (storage - 2) * 1024


def test_an_existing_cluster_is_used_when_named(moto_server: str) -> None:
    client(moto_server, "ecs").create_cluster(clusterName="apps")
    stack = deploy(moto_server, "in-apps", ClusterName="apps", MinTasks="3", MaxTasks="6",
                   BufferType="memory", Cpu="2048", EphemeralStorageGiB="100")  # fmt: skip
    env = container_env(moto_server, stack, "apps")
    assert (env["BUFFER_TYPE"], env["BUFFER_TOTAL_LIMIT"]) == ("memory", "256MiB")
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}
    assert outputs["ClusterName"] == "apps"
    ecs = client(moto_server, "ecs")
    service = ecs.describe_services(cluster="apps", services=[outputs["ServiceName"]])
    assert service["services"][0]["desiredCount"] == 3
    resources = client(moto_server, "cloudformation").list_stack_resources(StackName="in-apps")
    assert "Cluster" not in {r["LogicalResourceId"] for r in resources["StackResourceSummaries"]}


class _CfnLoader(yaml.SafeLoader):
    """Reads CloudFormation's short-form tags (!Ref, !Sub...) as plain values."""


def _any_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_scalar(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node)
    return loader.construct_mapping(node)  # type: ignore[arg-type]


_CfnLoader.add_multi_constructor("!", _any_tag)
