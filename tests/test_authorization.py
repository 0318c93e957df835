"""windfleet.nucleus.authorization against the nucleus' own behaviour.

Every test names the aws-greengrass-nucleus source (src/main/java/com/aws/greengrass/...) or
the Greengrass developer-guide page it follows.
"""

from __future__ import annotations

import pytest

from windfleet.nucleus import authorization as az
from windfleet.nucleus.authorization import (
    CLI, MQTTPROXY, PUBSUB, Authorizer, check_publish_topic, is_wildcard_filter, mqtt_topic_matches,
)

PUB = az.PUBLISH_TO_TOPIC
SUB = az.SUBSCRIBE_TO_TOPIC
IOT_PUB = az.PUBLISH_TO_IOT_CORE
IOT_SUB = az.SUBSCRIBE_TO_IOT_CORE

# Every assertion of the nucleus' src/test/java/com/aws/greengrass/authorization/WildcardTrieTest.java,
# transcribed in order: ("new", trie) | ("add", trie, resource) | ("std"|"mqtt", trie, resource, expected).
WILDCARD_TRIE_TEST = [
    ("new", 'rt'),
    ("add", 'rt', "nowildcard"),
    ("std", 'rt', "nowildcard", True),
    ("std", 'rt', "topic", False),
    ("mqtt", 'rt', "nowildcard", True),
    ("mqtt", 'rt', "topic", False),
    ("add", 'rt', "abc*xy*z"),
    ("std", 'rt', "abc123xyabc!@/<>#$%^&*()_+-=z", True),
    ("std", 'rt', "abcxyz", True),
    ("std", 'rt', "abcxy/ 7895z", True),
    ("std", 'rt', "abc123xy90zABCz", True),
    ("std", 'rt', "abc123xy90zABCxyABCz", True),
    ("std", 'rt', "abc123x123xyz", True),
    ("std", 'rt', "ab789xyz123", False),
    ("std", 'rt', "abc789xy56z123", False),
    ("std", 'rt', "abc123xy90zABCzz0", False),
    ("std", 'rt', "abc123yx90z", False),
    ("std", 'rt', "abc123xqwez", False),
    ("std", 'rt', "", False),
    ("mqtt", 'rt', "abc123xyabc!@/<>#$%^&*()_+-=z", True),
    ("mqtt", 'rt', "abcxyz", True),
    ("mqtt", 'rt', "abcxy/ 7895z", True),
    ("mqtt", 'rt', "abc123xy90zABCz", True),
    ("mqtt", 'rt', "abc123xy90zABCxyABCz", True),
    ("mqtt", 'rt', "ab789xyz123", False),
    ("mqtt", 'rt', "abc789xy56z123", False),
    ("mqtt", 'rt', "abc123xy90zABCzz0", False),
    ("mqtt", 'rt', "abc123yx90z", False),
    ("mqtt", 'rt', "", False),
    ("add", 'rt', "abc*xy*23"),
    ("std", 'rt', "abc789xy56z123", True),
    ("mqtt", 'rt', "abc789xy56z123", True),
    ("add", 'rt', "abc*xy*"),
    ("std", 'rt', "abc123xy90zABCzz0", True),
    ("mqtt", 'rt', "abc123xy90zABCzz0", True),
    ("add", 'rt', "abc*yx*z"),
    ("std", 'rt', "abc123yx90z", True),
    ("mqtt", 'rt', "abc123yx90z", True),
    ("new", 'rt1'),
    ("add", 'rt1', "*qwe*90*"),
    ("std", 'rt1', "abcqwe12390abcde", True),
    ("std", 'rt1', "qwe90", True),
    ("std", 'rt1', "qwe9012", True),
    ("std", 'rt1', "789qwe-+9qwe-+90ABC", True),
    ("std", 'rt1', "789qwe-+9A", False),
    ("std", 'rt1', "ABC89078", False),
    ("mqtt", 'rt1', "abcqwe12390abcde", True),
    ("mqtt", 'rt1', "qwe90", True),
    ("mqtt", 'rt1', "qwe9012", True),
    ("mqtt", 'rt1', "789qwe-+9qwe-+90ABC", True),
    ("mqtt", 'rt1', "789qwe-+9A", False),
    ("mqtt", 'rt1', "ABC89078", False),
    ("add", 'rt1', "*90*"),
    ("std", 'rt1', "ABC89078", True),
    ("mqtt", 'rt1', "ABC89078", True),
    ("new", 'rt2'),
    ("add", 'rt2', "ab/*/c"),
    ("std", 'rt2', "ab/12/c", True),
    ("std", 'rt2', "ab/1/3/2/c", True),
    ("std", 'rt2', "ab/1/34/2/c/", False),
    ("mqtt", 'rt2', "ab/12/c", True),
    ("mqtt", 'rt2', "ab/1/3/2/c", True),
    ("mqtt", 'rt2', "ab/1/34/2/c/", False),
    ("new", 'rt3'),
    ("add", 'rt3', "*wer"),
    ("std", 'rt3', "123werX", False),
    ("mqtt", 'rt3', "123werX", False),
    ("add", 'rt3', "*"),
    ("std", 'rt3', "123werX", True),
    ("std", 'rt3', "9999/88", True),
    ("mqtt", 'rt3', "123werX", True),
    ("mqtt", 'rt3', "9999/88", True),
    ("new", 'rt4'),
    ("add", 'rt4', "**/abc"),
    ("std", 'rt4', "78/abc", True),
    ("std", 'rt4', "7/8/abc", True),
    ("std", 'rt4', "78/abc", True),
    ("mqtt", 'rt4', "78/abc", True),
    ("mqtt", 'rt4', "7/8/abc", True),
    ("mqtt", 'rt4', "78/abc", True),
    ("new", 'rt'),
    ("add", 'rt', "abc/#"),
    ("mqtt", 'rt', "abc/1/2/3", True),
    ("mqtt", 'rt', "abc", True),
    ("mqtt", 'rt', "abc/", True),
    ("mqtt", 'rt', "abc/4/5/6", True),
    ("mqtt", 'rt', "abcd/e/f123/4/5/6", False),
    ("std", 'rt', "abc/1/2/3", False),
    ("std", 'rt', "abc", False),
    ("std", 'rt', "abc/", False),
    ("std", 'rt', "abc/4/5/6", False),
    ("std", 'rt', "abcd/e/f123/4/5/6", False),
    ("std", 'rt', "abc/#", True),
    ("add", 'rt', "123/#/xyz/#"),
    ("mqtt", 'rt', "123/#/xyz", True),
    ("mqtt", 'rt', "123/#/xyz/1/2/345", True),
    ("mqtt", 'rt', "123/4/5/6/xyz/abc", False),
    ("mqtt", 'rt', "12/34/zzz/45", False),
    ("std", 'rt', "123/#/xyz", False),
    ("std", 'rt', "123/#/xyz/1/2/345", False),
    ("std", 'rt', "123/4/5/6/xyz/abc", False),
    ("std", 'rt', "12/34/zzz/45", False),
    ("std", 'rt', "123/#/xyz/#", True),
    ("add", 'rt', "#/zzz/45"),
    ("mqtt", 'rt', "x/zzz/45", False),
    ("mqtt", 'rt', "#/zzz/45", True),
    ("std", 'rt', "#/zzz/45", True),
    ("new", 'rt1'),
    ("add", 'rt1', "#"),
    ("mqtt", 'rt1', "asdu76/asdas/23", True),
    ("mqtt", 'rt1', "**90io", True),
    ("std", 'rt1', "asdu76/asdas/23", False),
    ("std", 'rt1', "**90io", False),
    ("std", 'rt1', "#", True),
    ("new", 'rt2'),
    ("add", 'rt2', "/#"),
    ("mqtt", 'rt2', "", True),
    ("mqtt", 'rt2', "/a/b/c/d/e", True),
    ("mqtt", 'rt2', "a/b/c/d", False),
    ("mqtt", 'rt2', "asd", False),
    ("std", 'rt2', "", False),
    ("std", 'rt2', "/a/b/c/d/e", False),
    ("std", 'rt2', "a/b/c/d", False),
    ("std", 'rt2', "asd", False),
    ("std", 'rt2', "/#", True),
    ("new", 'rt3'),
    ("add", 'rt3', "w/qqq#"),
    ("mqtt", 'rt3', "w/qqq/e/r", False),
    ("mqtt", 'rt3', "w/qqq#", True),
    ("std", 'rt3', "w/qqq/e/r", False),
    ("std", 'rt3', "w/qqq#", True),
    ("add", 'rt3', "12/#/"),
    ("mqtt", 'rt3', "12/4/5/6", False),
    ("mqtt", 'rt3', "12/#/", True),
    ("std", 'rt3', "12/4/5/6", False),
    ("std", 'rt3', "12/#/", True),
    ("add", 'rt3', "##"),
    ("mqtt", 'rt3', "abcd", False),
    ("mqtt", 'rt3', "##", True),
    ("std", 'rt3', "abcd", False),
    ("std", 'rt3', "##", True),
    ("new", 'rt'),
    ("add", 'rt', "abc/+/123"),
    ("mqtt", 'rt', "abc/def/123", True),
    ("mqtt", 'rt', "abc/def/g/123", False),
    ("std", 'rt', "abc/def/123", False),
    ("std", 'rt', "abc/def/g/123", False),
    ("std", 'rt', "abc/+/123", True),
    ("add", 'rt', "+/56"),
    ("mqtt", 'rt', "123/56", True),
    ("mqtt", 'rt', "89/1/56", False),
    ("std", 'rt', "123/56", False),
    ("std", 'rt', "89/1/56", False),
    ("std", 'rt', "+/56", True),
    ("add", 'rt', "xyz/+/abcd/+/1"),
    ("mqtt", 'rt', "xyz/ghj/abcd//1", True),
    ("std", 'rt', "xyz/ghj/abcd//1", False),
    ("add", 'rt', "123/fgh/+"),
    ("mqtt", 'rt', "123/fgh/ert", True),
    ("mqtt", 'rt', "123/fgh/12/34", False),
    ("std", 'rt', "123/fgh/ert", False),
    ("std", 'rt', "123/fgh/12/34", False),
    ("std", 'rt', "123/fgh/+", True),
    ("add", 'rt', "89/+/+/+/90"),
    ("mqtt", 'rt', "89/1/2/3/90", True),
    ("mqtt", 'rt', "89/1/2//90", True),
    ("mqtt", 'rt', "89/1/2/90", False),
    ("mqtt", 'rt', "89/1/2/3/4/90", False),
    ("std", 'rt', "89/1/2/3/90", False),
    ("std", 'rt', "89/1/2//90", False),
    ("std", 'rt', "89/1/2/90", False),
    ("std", 'rt', "89/1/2/3/4/90", False),
    ("std", 'rt', "89/+/+/+/90", True),
    ("new", 'rt1'),
    ("add", 'rt1', "+"),
    ("mqtt", 'rt1', "abc", True),
    ("mqtt", 'rt1', "/123", False),
    ("std", 'rt1', "abc", False),
    ("std", 'rt1', "+", True),
    ("add", 'rt1', "+/+"),
    ("mqtt", 'rt1', "/123", True),
    ("mqtt", 'rt1', "/123/", False),
    ("std", 'rt1', "/123", False),
    ("std", 'rt1', "+/+", True),
    ("new", 'rt2'),
    ("add", 'rt2', "ax/qwe+/123"),
    ("mqtt", 'rt2', "ax/qwert/123", False),
    ("mqtt", 'rt2', "ax/qwe+/123", True),
    ("std", 'rt2', "ax/qwert/123", False),
    ("std", 'rt2', "ax/qwe+/123", True),
    ("add", 'rt2', "12/+23"),
    ("mqtt", 'rt2', "12/x23", False),
    ("std", 'rt2', "12/x23", False),
    ("std", 'rt2', "12/+23", True),
    ("add", 'rt2', "/+/++"),
    ("mqtt", 'rt2', "/33/ty", False),
    ("mqtt", 'rt2', "/zz/++", True),
    ("std", 'rt2', "/33/ty", False),
    ("std", 'rt2', "/zz/++", False),
    ("new", 'rt'),
    ("add", 'rt', "xyz*/+/*room/#"),
    ("mqtt", 'rt', "xyzzzz/89/bedroom/light/5", True),
    ("mqtt", 'rt', "xyzzzz/89/fan2/bedroom/light/5", True),
    ("std", 'rt', "xyzzzz/89/bedroom/light/5", False),
    ("std", 'rt', "xyzzzz/89/fan2/bedroom/light/5", False),
    ("std", 'rt', "xyzzzz/+/bedroom/#", True),
    ("add", 'rt', "12/*#"),
    ("mqtt", 'rt', "12/345#", True),
    ("mqtt", 'rt', "12/34/5#", True),
    ("mqtt", 'rt', "12/45/67", False),
    ("std", 'rt', "12/345#", True),
    ("std", 'rt', "12/34/5#", True),
    ("std", 'rt', "12/45/67", False),
    ("add", 'rt', "x*ui/+/#"),
    ("mqtt", 'rt', "xyzzzzui/89/fan2/bedroom/light/5", True),
    ("mqtt", 'rt', "xyz/zz34ui/matchPlus/23", True),
    ("mqtt", 'rt', "xyz/zz34/matchPlus/23", False),
    ("mqtt", 'rt', "xyzzz34", False),
    ("std", 'rt', "xyzzzzui/89/fan2/bedroom/light/5", False),
    ("std", 'rt', "xyz/zz34ui/matchPlus/23", False),
    ("std", 'rt', "xyzzz34", False),
    ("std", 'rt', "xcvui/+/#", True),
    ("add", 'rt', "a/+/+/#/+"),
    ("mqtt", 'rt', "a/b/c/#/d", True),
    ("mqtt", 'rt', "a/b/c/d/e", False),
    ("std", 'rt', "a/+/+/#/+", True),
    ("add", 'rt', "#"),
    ("mqtt", 'rt', "xyzzzz/89/fan2/bedroom/light/5", True),
    ("mqtt", 'rt', "12/45/67", True),
    ("mqtt", 'rt', "xyzzz34", True),
    ("mqtt", 'rt', "a/b/c/d/e", True),
    ("std", 'rt', "xyzzzz/89/fan2/bedroom/light/5", False),
    ("std", 'rt', "12/45/67", False),
    ("std", 'rt', "xyzzz34", False),
    ("std", 'rt', "a/b/c/d/e", False),
    ("new", 'rt1'),
    ("add", 'rt1', "2131/#/#/+/ui/#"),
    ("mqtt", 'rt1', "2131/x/y/z/ui/1", False),
    ("mqtt", 'rt1', "2131/#/#/z/ui/1/56", True),
    ("add", 'rt1', "*"),
    ("mqtt", 'rt1', "2131/x/y/z/ui/1", True),
    ("std", 'rt1', "2131/x/y/z/ui/1", True),
    ("new", 'rt2'),
    ("add", 'rt2', "abc*/#"),
    ("mqtt", 'rt2', "abc123", True),
    ("add", 'rt2', "x*/+/#"),
    ("mqtt", 'rt2', "xcvb/123", True),
    ("mqtt", 'rt2', "xcvb/123/4/5", True),
    ("new", 'rt3'),
    ("add", 'rt3', "a/*bc/#"),
    ("mqtt", 'rt3', "a/xyzbc", True),
    ("mqtt", 'rt3', "a/xyzbc/", True),
    ("mqtt", 'rt3', "a/xyzbc/1/2", True),
    ("mqtt", 'rt3', "a/xyzbcnt/bc", True),
    ("mqtt", 'rt3', "a/xyzbcnt/bc/", True),
    ("mqtt", 'rt3', "a/xyzbc/nt/bc", True),
    ("std", 'rt3', "a/xyzbc", False),
    ("std", 'rt3', "a/xyzbc/", False),
    ("std", 'rt3', "a/xyzbc/1/2", False),
    ("std", 'rt3', "a/xyzbcnt/bc", False),
    ("std", 'rt3', "a/xyzbcnt/bc/", False),
    ("std", 'rt3', "a/xyzbc/nt/bc", False),
    ("std", 'rt3', "a/xyzbc/nt/bc/#", True),
    ("new", 'rt4'),
    ("add", 'rt4', "a/+/#"),
    ("mqtt", 'rt4', "a/xyz", True),
    ("mqtt", 'rt4', "a/xyz/", True),
    ("mqtt", 'rt4', "a/xyz/nt", True),
    ("mqtt", 'rt4', "a", False),
    ("mqtt", 'rt4', "a/", True),
    ("new", 'rt'),
    ("add", 'rt', "acv/rt${*}mk"),
    ("add", 'rt', "${$}/begin"),
    ("add", 'rt', "end/${?}"),
    ("std", 'rt', "acv/rt*mk", True),
    ("std", 'rt', "acv/rt${*}mk", False),
    ("std", 'rt', "acv/rt123mk", False),
    ("std", 'rt', "$/begin", True),
    ("std", 'rt', "${$}/begin", False),
    ("std", 'rt', "end/?", True),
    ("std", 'rt', "end/${?}", False),
    ("mqtt", 'rt', "acv/rt*mk", True),
    ("mqtt", 'rt', "acv/rt${*}mk", False),
    ("mqtt", 'rt', "$/begin", True),
    ("mqtt", 'rt', "${$}/begin", False),
    ("mqtt", 'rt', "end/?", True),
    ("mqtt", 'rt', "end/${?}", False),
    ("new", 'rt2'),
    ("add", 'rt2', "acv/rt${$}{*}mk"),
    ("std", 'rt2', "acv/rt${abc/123/=-_+}mk", True),
    ("std", 'rt2', "rt${$}{*}mk", False),
    ("new", 'rt3'),
    ("add", 'rt3', "${*}"),
    ("std", 'rt3', "*", True),
    ("std", 'rt3', "*ab", False),
    ("std", 'rt3', "12/3", False),
    ("std", 'rt3', "abc/def/g", False),
    ("mqtt", 'rt3', "*", True),
    ("mqtt", 'rt3', "*ab", False),
    ("mqtt", 'rt3', "12/3", False),
    ("mqtt", 'rt3', "abc/def/g", False),
    ("new", 'rt4'),
    ("add", 'rt4', "abc${"),
    ("std", 'rt4', "abc${", True),
    ("std", 'rt4', "abc", False),
    ("add", 'rt4', "123$"),
    ("std", 'rt4', "123$", True),
    ("add", 'rt4', "456$*"),
    ("std", 'rt4', "456$123/abc", True),
    ("std", 'rt4', "456*", False),
    ("add", 'rt4', "qwe${ca}"),
    ("std", 'rt4', "qwe${ca}", True),
    ("std", 'rt4', "qweca", False),
]


def test_wildcard_trie_matches_the_nucleus_test_suite():
    # authorization/WildcardTrie.java, checked with the nucleus' WildcardTrieTest.java vectors.
    tries: dict[str, az._Trie] = {}
    failures = []
    for step in WILDCARD_TRIE_TEST:
        if step[0] == "new":
            tries[step[1]] = az._Trie()
        elif step[0] == "add":
            tries[step[1]].add(step[2])
        else:
            kind, name, resource, expected = step
            trie = tries[name]
            got = trie.matches_standard(resource) if kind == "std" else trie.matches_mqtt(resource)
            if got != expected:
                failures.append(step)
    assert sum(s[0] in ("std", "mqtt") for s in WILDCARD_TRIE_TEST) == 243
    assert failures == []


def policy(operations, resources, policy_id="p1", service=PUBSUB):
    return {"accessControl": {service: {policy_id: {"policyDescription": "test",
                                                     "operations": operations, "resources": resources}}}}


def authorizer(component="com.example.A", configuration=None, **kwargs):
    auth = Authorizer("thing-1", **kwargs)
    auth.set_component(component, configuration)
    return auth


def test_pubsub_star_wildcard_anywhere():
    # authorization/WildcardTrie.java matchesStandard; developer guide "Authorize components to
    # perform IPC operations" (wildcards anywhere in a resource since nucleus 2.6.0).
    auth = authorizer(configuration=policy([PUB], ["windfleet/*/scores", "raw/*"]))
    assert auth.is_authorized("com.example.A", PUBSUB, PUB, "windfleet/t01/scores")
    assert auth.is_authorized("com.example.A", PUBSUB, PUB, "windfleet/a/b/c/scores")  # * crosses "/"
    assert auth.is_authorized("com.example.A", PUBSUB, PUB, "raw/")
    assert not auth.is_authorized("com.example.A", PUBSUB, PUB, "windfleet/t01/scores/x")
    assert not auth.is_authorized("com.example.A", PUBSUB, PUB, "raw")
    assert not auth.is_authorized("com.example.A", PUBSUB, SUB, "raw/x")  # other operation
    everything = authorizer(configuration=policy([SUB], ["*"]))
    assert everything.is_authorized("com.example.A", PUBSUB, SUB, "any/thing/+")


def test_pubsub_escapes_are_literal():
    # authorization/WildcardTrie.java getActualChar + AuthorizationModule.validateResource.
    auth = authorizer(configuration=policy([PUB], ["a/${*}", "b/${?}", "c/${$}x"]))
    assert auth.is_authorized("com.example.A", PUBSUB, PUB, "a/*")
    assert not auth.is_authorized("com.example.A", PUBSUB, PUB, "a/anything")
    assert auth.is_authorized("com.example.A", PUBSUB, PUB, "b/?")
    assert auth.is_authorized("com.example.A", PUBSUB, PUB, "c/$x")
    assert not auth.is_authorized("com.example.A", PUBSUB, PUB, "c/${$}x")


def test_pubsub_plus_and_hash_are_literal():
    # authorization/WildcardTrie.java matchesStandard; PubSubIPCEventStreamAgent.doAuthorization
    # uses ResourceLookupPolicy.STANDARD, so a filter with +/# must be allowed as text.
    auth = authorizer(configuration=policy([SUB], ["windfleet/+/scores", "fleet/#"]))
    assert auth.is_authorized("com.example.A", PUBSUB, SUB, "windfleet/+/scores")
    assert not auth.is_authorized("com.example.A", PUBSUB, SUB, "windfleet/t01/scores")
    assert auth.is_authorized("com.example.A", PUBSUB, SUB, "fleet/#")
    assert not auth.is_authorized("com.example.A", PUBSUB, SUB, "fleet/x")
    concrete = authorizer(configuration=policy([SUB], ["windfleet/t01/scores"]))
    assert not concrete.is_authorized("com.example.A", PUBSUB, SUB, "windfleet/+/scores")
    starred = authorizer(configuration=policy([SUB], ["windfleet/*"]))
    assert starred.is_authorized("com.example.A", PUBSUB, SUB, "windfleet/+/scores")
    assert starred.is_authorized("com.example.A", PUBSUB, SUB, "windfleet/#")


def test_mqttproxy_uses_mqtt_wildcards():
    # builtin/services/mqttproxy/MqttProxyIPCAgent.doAuthorization -> ResourceLookupPolicy.MQTT_STYLE,
    # authorization/WildcardTrie.java matchesMQTT.
    cfg = policy([IOT_PUB, IOT_SUB], ["windfleet/+/scores", "fleet/#", "dev/*/x"], service=MQTTPROXY)
    auth = authorizer(configuration=cfg)
    ok = lambda op, topic: auth.is_authorized("com.example.A", MQTTPROXY, op, topic)  # noqa: E731
    assert ok(IOT_PUB, "windfleet/t01/scores")
    assert not ok(IOT_PUB, "windfleet/a/b/scores")        # + is one level
    assert ok(IOT_PUB, "fleet") and ok(IOT_PUB, "fleet/a/b")
    assert not ok(IOT_PUB, "fleetx")
    assert ok(IOT_SUB, "windfleet/+/scores")              # the filter itself matches too
    assert ok(IOT_SUB, "fleet/#")
    assert ok(IOT_PUB, "dev/a/b/x")                       # * still crosses levels
    # The same policy under pubsub is literal.
    literal = authorizer(configuration=policy([PUB], ["windfleet/+/scores"]))
    assert not literal.is_authorized("com.example.A", PUBSUB, PUB, "windfleet/t01/scores")


def test_thing_name_literal_unless_interpolated():
    # componentmanager/KernelConfigResolver.java: configuration is interpolated only when
    # interpolateComponentConfiguration is true (developer guide "Greengrass nucleus configuration").
    cfg = policy([PUB], ["windfleet/devices/{iot:thingName}/#", "x/{iot:thingName}"])
    plain = authorizer(configuration=cfg)
    assert not plain.is_authorized("com.example.A", PUBSUB, PUB, "x/thing-1")
    assert plain.is_authorized("com.example.A", PUBSUB, PUB, "x/{iot:thingName}")
    interpolated = authorizer(configuration=cfg, interpolate=True)
    assert interpolated.is_authorized("com.example.A", PUBSUB, PUB, "x/thing-1")
    assert not interpolated.is_authorized("com.example.A", PUBSUB, PUB, "x/{iot:thingName}")
    # "#" stays literal for pubsub even after interpolation.
    assert interpolated.is_authorized("com.example.A", PUBSUB, PUB, "windfleet/devices/thing-1/#")
    assert not interpolated.is_authorized("com.example.A", PUBSUB, PUB, "windfleet/devices/thing-1/x")


def test_thing_name_interpolation_reaches_a_json_string_access_control():
    # authorization/AuthorizationPolicyParser.java reads a leaf accessControl as JSON;
    # KernelConfigResolver.interpolate replaces inside any string value.
    cfg = {"accessControl": '{"aws.greengrass.ipc.pubsub": {"p": {"operations": ["*"], '
                            '"resources": ["t/{iot:thingName}"]}}}'}
    auth = authorizer(configuration=cfg, interpolate=True)
    assert auth.errors == []
    assert auth.is_authorized("com.example.A", PUBSUB, PUB, "t/thing-1")


def test_operation_star_and_unregistered_operations():
    # authorization/AuthorizationHandler.java isAuthorized (combinations with ANY_REGEX) and isOperationValid.
    auth = authorizer(configuration=policy(["*"], ["a/b"]))
    assert auth.is_authorized("com.example.A", PUBSUB, PUB, "a/b")
    assert auth.is_authorized("com.example.A", PUBSUB, SUB, "a/b")
    assert not auth.is_authorized("com.example.A", PUBSUB, "aws.greengrass#GetConfiguration", "a/b")
    assert auth.check("com.example.A", PUBSUB, "aws.greengrass#GetConfiguration", "a/b") == (
        "Component aws.greengrass.ipc.pubsub not registered for operation aws.greengrass#GetConfiguration")
    assert not auth.is_authorized("com.example.A", MQTTPROXY, IOT_PUB, "a/b")   # other service


def test_unknown_component_denied_with_the_nucleus_message():
    # authorization/AuthorizationHandler.java isAuthorized: the AuthorizationException text.
    auth = authorizer(configuration=policy([PUB], ["a/b"]))
    assert not auth.is_authorized("com.example.Other", PUBSUB, PUB, "a/b")
    assert auth.check("com.example.Other", PUBSUB, PUB, "a/b") == (
        "Principal com.example.Other is not authorized to perform "
        "aws.greengrass.ipc.pubsub:aws.greengrass#PublishToTopic on resource a/b")
    assert auth.denial_message("c", MQTTPROXY, IOT_PUB, None) == (
        "Principal c is not authorized to perform aws.greengrass.ipc.mqttproxy:"
        "aws.greengrass#PublishToIoTCore on resource null")
    assert az.MQTTPROXY_UNAUTHORIZED_MESSAGE == "Not Authorized"


def test_empty_resource_is_refused_by_authorization():
    # authorization/AuthorizationModule.java isPresent: "Resource cannot be empty" (Utils.isEmpty).
    auth = authorizer(configuration=policy([PUB], ["*"]))
    assert auth.check("com.example.A", PUBSUB, PUB, "") == "Resource cannot be empty"
    assert auth.check("com.example.A", PUBSUB, PUB, " ") == "Resource cannot be empty"
    assert auth.is_authorized("com.example.A", PUBSUB, PUB, "\t")   # a tab is not a space separator


def test_remove_and_reload_component():
    # authorization/AuthorizationHandler.java: every config change reloads all policies.
    auth = authorizer(configuration=policy([PUB], ["a"]))
    auth.set_component("com.example.B", policy([PUB], ["b"]))
    assert auth.is_authorized("com.example.B", PUBSUB, PUB, "b")
    auth.set_component("com.example.A", policy([PUB], ["a2"]))
    assert not auth.is_authorized("com.example.A", PUBSUB, PUB, "a")
    assert auth.is_authorized("com.example.A", PUBSUB, PUB, "a2")
    auth.remove_component("com.example.A")
    assert not auth.is_authorized("com.example.A", PUBSUB, PUB, "a2")
    assert auth.is_authorized("com.example.B", PUBSUB, PUB, "b")
    auth.set_component("com.example.B", None)
    assert not auth.is_authorized("com.example.B", PUBSUB, PUB, "b")


def test_cli_destination_name():
    # authorization/AuthorizationHandler.java CLI_SERVICE_NAME = "aws.greengrass.Cli".
    assert CLI == "aws.greengrass.Cli"
    cfg = policy(["aws.greengrass#ListComponents"], ["*"], service=CLI)
    auth = authorizer(configuration=cfg)
    assert auth.is_authorized("com.example.A", CLI, "aws.greengrass#ListComponents", "*")
    assert not auth.is_authorized("com.example.A", CLI, "aws.greengrass#RestartComponent", "*")


@pytest.mark.parametrize("configuration, still_allowed", [
    # authorization/AuthorizationPolicyParser.java: a Jackson conversion failure drops the
    # component's whole accessControl ...
    ({"accessControl": "not json"}, False),
    ({"accessControl": ["list"]}, False),
    ({"accessControl": {PUBSUB: ["p1"]}}, False),
    ({"accessControl": {PUBSUB: {"p1": "text"}}}, False),
    ({"accessControl": {PUBSUB: {"p1": {"operations": PUB, "resources": ["a"]}}}}, False),
    ({"accessControl": {PUBSUB: {"p1": {"operations": [PUB], "resource": ["a"]}}}}, False),
    ({"accessControl": {PUBSUB: {"p1": {"operations": [PUB], "resources": [{"x": 1}]}}}}, False),
    ({"accessControl": {PUBSUB: None}}, False),
    # ... empty operations drop one policy (parseAuthorizationPolicyConfig), an unknown
    # service only its own policies (loadAuthorizationPolicies), a bad resource only itself
    # (AuthorizationModule.validateResource).
    ({"accessControl": {PUBSUB: {"p1": {"operations": [], "resources": ["a"]}}}}, False),
    ({"accessControl": {"no.such.Service": {"p1": {"operations": ["*"], "resources": ["a"]}}}}, False),
    ({"accessControl": {PUBSUB: {"p1": {"operations": [PUB], "resources": ["a?", "b${x}", "c${", ""]}}}}, False),
])
def test_bad_policy_shapes_do_not_raise(configuration, still_allowed):
    auth = Authorizer("thing-1")
    auth.set_component("com.example.Good", policy([PUB], ["good"]))
    auth.set_component("com.example.Bad", configuration)
    assert auth.errors, "the reason is kept"
    assert all(isinstance(e, str) for e in auth.errors)
    assert auth.is_authorized("com.example.Good", PUBSUB, PUB, "good")
    assert auth.is_authorized("com.example.Bad", PUBSUB, PUB, "a") is still_allowed


def test_bad_resource_skipped_but_siblings_kept():
    # authorization/AuthorizationHandler.java addPermission catches per resource.
    auth = authorizer(configuration=policy([PUB], ["a?", "ok", "${x}"]))
    assert auth.is_authorized("com.example.A", PUBSUB, PUB, "ok")
    assert len(auth.errors) == 2
    assert "'?'" in auth.errors[0]


def test_unregistered_operation_is_logged_but_policy_loaded():
    # authorization/AuthorizationHandler.java loadAuthorizationPolicies: validateOperations only logs.
    auth = authorizer(configuration=policy([PUB, "publish"], ["a"]))
    assert auth.is_authorized("com.example.A", PUBSUB, PUB, "a")
    assert any("not registered" in e for e in auth.errors)


def test_empty_policy_id_voids_the_service_reload_for_everyone():
    # authorization/AuthorizationHandler.java validatePolicyId: the whole service's list is
    # refused and the previous permissions stay.
    auth = authorizer(configuration=policy([PUB], ["a"]))
    auth.set_component("com.example.B", policy([PUB], ["b"], policy_id=""))
    assert auth.is_authorized("com.example.A", PUBSUB, PUB, "a")        # kept from before
    assert not auth.is_authorized("com.example.B", PUBSUB, PUB, "b")
    assert any("empty policy id" in e for e in auth.errors)
    fresh = Authorizer("thing-1")
    fresh.set_component("com.example.B", policy([PUB], ["b"], policy_id=""))
    fresh.set_component("com.example.A", policy([PUB], ["a"]))
    assert not fresh.is_authorized("com.example.A", PUBSUB, PUB, "a")


def test_case_insensitive_fields_and_scalar_coercion():
    # authorization/AuthorizationPolicyParser.java: ACCEPT_CASE_INSENSITIVE_PROPERTIES, Jackson
    # coerces scalars into Set<String>.
    cfg = {"accessControl": {PUBSUB: {"p": {"Operations": [PUB], "RESOURCES": [42, True]}}}}
    auth = authorizer(configuration=cfg)
    assert auth.errors == []
    assert auth.is_authorized("com.example.A", PUBSUB, PUB, "42")
    assert auth.is_authorized("com.example.A", PUBSUB, PUB, "true")


def test_token_exchange_default_policy():
    # authorization/AuthorizationHandler.java getDefaultPolicies: everyone may getCredentials.
    auth = authorizer(configuration=policy(["*"], ["x"], service=az.TOKEN_EXCHANGE))
    assert auth.is_authorized("anyone", az.TOKEN_EXCHANGE, az.TES_OPERATION, None)
    assert not auth.is_authorized("com.example.A", az.TOKEN_EXCHANGE, az.TES_OPERATION, "x")


@pytest.mark.parametrize("topic, iot_core, message", [
    # builtin/services/pubsub/PubSubIPCEventStreamAgent.handlePublishToTopicRequest
    ("a/b", False, None),
    ("", False, None),              # refused earlier by authorization, see test_empty_resource_...
    (None, False, "Publish topic must not be null"),
    ("a/+", False, "Publish topic must not contain a wildcard."),
    ("a/#", False, "Publish topic must not contain a wildcard."),
    ("a*b", False, "Publish topic must not contain a wildcard."),
    # builtin/services/mqttproxy/MqttProxyIPCAgent.validateTopic, mqttclient/IotCoreTopicValidator
    (None, True, "Topic is required"),
    ("a/+", True, "Publish topics must not contain wildcard characters of '#' or '+'"),
    ("a*b", True, None),
])
def test_check_publish_topic(topic, iot_core, message):
    assert check_publish_topic(topic, iot_core=iot_core) == message


@pytest.mark.parametrize("topic_filter, topic, expected", [
    # builtin/services/pubsub/SubscriptionTrie.get
    ("a/b", "a/b", True),
    ("a/b", "a/c", False),
    ("a/+", "a/b", True),
    ("a/+", "a/b/c", False),
    ("a/+", "a/", False),           # trailing "/" is dropped by Java's split: "a/" is "a"
    ("+/b", "/b", True),            # + matches an empty level
    ("a/#", "a/b/c", True),
    ("a/#", "a", False),            # unlike MQTT: "a/#" does not receive "a"
    ("#", "x/y", True),
    ("a/#/c", "a/x/c", True),       # a # that is not last acts as +
    ("a/#/c", "a/x/y/c", False),
    ("a/b/", "a/b", True),
    ("a/b", "a/b/c", False),
    ("a/b+", "a/bc", False),        # wildcards only as whole levels
    ("/", "/", False),
])
def test_mqtt_topic_matches(topic_filter, topic, expected):
    assert mqtt_topic_matches(topic_filter, topic) is expected


def test_is_wildcard_filter():
    # builtin/services/pubsub/SubscriptionTrie.isWildcard (decides the default receiveMode).
    assert is_wildcard_filter("a/+/c") and is_wildcard_filter("a/#") and is_wildcard_filter("#")
    assert not is_wildcard_filter("a/#/c") and not is_wildcard_filter("a/b+") and not is_wildcard_filter("a/*")
