/*
 * ChatSearchNode: boots one OpenSearch 2.19 node from the jars on the classpath, for
 * scripts/opensearch (development and tests of the search pipeline).
 *
 * Why it exists: the OpenSearch distribution (bin/opensearch, its plugin directories and
 * Bootstrap) is not published on Maven Central, only the server jar and the plugin jars. The
 * server's Node has a constructor that takes plugins already on the classpath (the one the
 * test framework's mock node uses); this class calls it with the two plugins a chat index
 * needs: the netty4 HTTP/transport layer and analysis-common (asciifolding and the other
 * token filters). Node.start() alone skips the production bootstrap checks, the security
 * manager and the plugin directories, which is what a loopback test node wants.
 *
 * Usage: java ... ChatSearchNode HOME_DIR
 *   HOME_DIR/config/opensearch.yml  the node's settings (written by scripts/opensearch)
 *   HOME_DIR/config/log4j2.properties  its logging
 * Runs until SIGTERM/SIGINT, then closes the node (flushes the shards) and exits 0. Exits 1
 * with the reason on stderr when the node cannot start.
 */

import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.Arrays;
import java.util.Collection;
import java.util.Collections;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;

import org.opensearch.analysis.common.CommonAnalysisPlugin;
import org.opensearch.common.logging.LogConfigurator;
import org.opensearch.common.settings.Settings;
import org.opensearch.env.Environment;
import org.opensearch.node.InternalSettingsPreparer;
import org.opensearch.node.Node;
import org.opensearch.plugins.Plugin;
import org.opensearch.transport.Netty4Plugin;

public final class ChatSearchNode {
    /** Node's plugin-taking constructor is protected: this subclass only opens it. */
    private static final class ClasspathNode extends Node {
        ClasspathNode(Environment env, Collection<Class<? extends Plugin>> plugins) {
            super(env, plugins, true);
        }
    }

    public static void main(String[] args) throws Exception {
        if (args.length != 1) {
            System.err.println("usage: ChatSearchNode HOME_DIR");
            System.exit(2);
        }
        Path home = Paths.get(args[0]).toAbsolutePath();
        Path config = home.resolve("config");

        // Logging first: OpenSearch refuses to configure log4j once a logger was used.
        LogConfigurator.registerErrorListener();
        Settings base = Settings.builder().put("path.home", home.toString()).build();
        Environment env = InternalSettingsPreparer.prepareEnvironment(
            base, Collections.emptyMap(), config, () -> "chat-search");
        LogConfigurator.setNodeName(Node.NODE_NAME_SETTING.get(env.settings()));
        LogConfigurator.configure(env);

        Collection<Class<? extends Plugin>> plugins =
            Arrays.asList(Netty4Plugin.class, CommonAnalysisPlugin.class);
        final Node node;
        try {
            node = new ClasspathNode(env, plugins);
            node.start();
        } catch (Exception e) {
            System.err.println("opensearch: the node did not start: " + e);
            e.printStackTrace();
            System.exit(1);
            return;
        }

        CountDownLatch closed = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try {
                node.close();
                node.awaitClose(20, TimeUnit.SECONDS);
            } catch (Exception e) {
                System.err.println("opensearch: closing the node failed: " + e);
            } finally {
                closed.countDown();
            }
        }, "chat-search-shutdown"));
        // The node's threads are daemons: keep the JVM alive until a signal arrives.
        closed.await();
    }
}
