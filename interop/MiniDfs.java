// The HDFS test peer: Apache Hadoop's MiniDFSCluster (one NameNode, one DataNode, replication 1)
// on 127.0.0.1, its NameNode RPC on the port given, its storage in the directory given. Run as a
// single-file program (Java 11+) with interop/lib/hdfs/* on the class path:
//   java -cp 'interop/lib/hdfs/*' interop/MiniDfs.java <namenode port> <directory>
// Prints "MiniDfs ready hdfs://127.0.0.1:<port>" once the cluster takes writes, then runs until
// killed (weir_testkit::peers::hdfs).
import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.hdfs.MiniDFSCluster;

public class MiniDfs {
    public static void main(String[] args) throws Exception {
        int port = Integer.parseInt(args[0]);
        Configuration conf = new Configuration();
        conf.set(MiniDFSCluster.HDFS_MINIDFS_BASEDIR, args[1]);
        conf.set("dfs.replication", "1");
        conf.set("dfs.permissions.enabled", "false");
        conf.set("dfs.namenode.safemode.extension", "0");
        // Small blocks are not needed; keep the DataNode's heartbeats quick for fast starts.
        conf.set("dfs.heartbeat.interval", "1");
        MiniDFSCluster cluster = new MiniDFSCluster.Builder(conf)
            .nameNodePort(port)
            .numDataNodes(1)
            .format(true)
            .build();
        cluster.waitActive();
        System.out.println("MiniDfs ready hdfs://127.0.0.1:" + port);
        System.out.flush();
        Thread.currentThread().join();
    }
}
